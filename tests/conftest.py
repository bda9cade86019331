"""Shared fixtures.

Third-party material (public sacct captures, the API contract) stays in ``../shared`` and is
read from there. CI always has it; elsewhere the tests that need it skip with a reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLURM_TRACKER_SHARED", REPO.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_shared(relative: str) -> Path:
    """Path of a file in ../shared; skip outside CI when it is missing, fail in CI."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} not found: third-party test material lives in ../shared"
        if IN_CI:
            pytest.fail(message + " (CI must have it)")
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _agent_logging_reset() -> Iterator[None]:
    """Every test starts and ends with the agent's logger as a process starts with it: a
    command run in-process (logs.setup), in a test or in a module-scoped fixture, gives it its
    own handlers and stops its propagation, which would hide its records from pytest's caplog
    in every later test of the same process."""
    _reset_agent_logging()
    yield
    _reset_agent_logging()


def _reset_agent_logging() -> None:
    logger = logging.getLogger("slurm_tracker")
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = []
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture
def public_fixtures() -> Path:
    """The folder of real, public sacct captures (see its MANIFEST.md)."""
    return need_shared("fixtures/sacct/public")


@pytest.fixture
def openapi_contract() -> Path:
    """The Allocations API contract (OpenAPI 3.1)."""
    return need_shared("reference/allocations-openapi.json")


def cli_runner() -> CliRunner:
    """A CliRunner that keeps stderr apart from stdout on every supported Click."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # Click 8.1 (Python 3.9)
    except TypeError:
        return CliRunner()  # Click 8.2 and later always keep them apart


def shown(result: Result) -> str:
    """All a command printed: its results (stdout), then its messages (stderr)."""
    return result.stdout + result.stderr
