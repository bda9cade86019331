"""Fixtures of the end-to-end tests, which run against the real Slurm box (tests/e2e/box)."""

from __future__ import annotations

import pytest

from tests.conftest import IN_CI
from tests.e2e import cluster


@pytest.fixture(scope="session")
def slurm_box() -> None:
    """The box, usable: skips with the reason outside CI when it is not, fails in CI."""
    reason = cluster.box_available()
    if reason is None:
        return
    message = f"Slurm box unavailable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI must start it with `make e2e-up` before the tests)")
    pytest.skip(message)
