"""times.py: ONE function writes every instant (``2026-01-31T23:59:59Z``), and it converts to
UTC first: an aware time in another zone is never printed as its wall time with a Z."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_tracker import events, health, output, state_rows
from slurm_tracker.config import Limits
from slurm_tracker.plausibility import implausible
from slurm_tracker.times import utc_text
from tests.factories import record

PARIS = timezone(timedelta(hours=2))
AT = datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
PACKAGE = Path(__file__).resolve().parent.parent / "slurm_tracker"


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (AT, "2026-01-31T23:59:59Z"),  # the fraction is dropped, not rounded
        (AT.astimezone(PARIS), "2026-01-31T23:59:59Z"),  # the same instant, shown in UTC
        (AT.astimezone(ZoneInfo("America/New_York")), "2026-01-31T23:59:59Z"),
        (datetime(2026, 3, 1, tzinfo=ZoneInfo("UTC")), "2026-03-01T00:00:00Z"),
        (datetime(2026, 3, 1, 12, 30), "2026-03-01T12:30:00Z"),  # naive: taken as UTC
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc), "9999-12-31T23:59:59Z"),
    ],
)
def test_utc_text(at: datetime, text: str) -> None:
    assert utc_text(at) == text


@given(st.datetimes(timezones=st.just(timezone.utc), min_value=datetime(1000, 1, 1)))
def test_the_fast_path_writes_what_strftime_writes(at: datetime) -> None:
    assert utc_text(at) == at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_years_before_1000_are_written_as_strftime_writes_them() -> None:
    at = datetime(999, 1, 1, tzinfo=timezone.utc)  # no zero padding on glibc: "999-01-01..."
    assert utc_text(at) == at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_old_names_are_the_one_function() -> None:
    assert events.rfc3339 is utc_text
    assert state_rows.iso is utc_text


def test_every_place_that_writes_a_time_shows_it_in_utc() -> None:
    paris = datetime(2026, 3, 1, 14, 0, tzinfo=PARIS)
    assert output.jsonable(paris) == "2026-03-01T12:00:00Z"
    history = {
        "lastSuccessAt": paris,
        "lastAttemptAt": None,
        "failedInARow": 0,
        "lastFailure": {"at": paris, "code": 75},
    }
    shown = health.json_times(history)
    assert shown["lastSuccessAt"] == shown["lastFailure"]["at"] == "2026-03-01T12:00:00Z"
    late = record(start_at=datetime(2026, 3, 10, tzinfo=timezone.utc))
    why = implausible(late, datetime(2026, 3, 1, 14, 0, tzinfo=PARIS), Limits())
    assert why is not None and "(now 2026-03-01T12:00:00Z," in why


#: Modules still formatting times themselves, being changed by other work (issue 10): each
#: should call times.utc_text; this list only shrinks.
NOT_YET: set[str] = set()


def test_no_other_module_formats_an_instant_itself() -> None:
    pattern = re.compile(r"%Y-%m-%dT%H:%M:%SZ")
    found = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert found - NOT_YET == {"times.py"}
