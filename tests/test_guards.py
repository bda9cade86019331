"""Guards on money-relevant behaviour that the unit suite let mutants through (issue 10, "Tests
to add first"): each test here fails on the mutant named in its comment.

- prune forgetting too much (the overlap or the ``final`` test dropped: whole runs re-billed),
  and a long-suspended run billed in steps, forgotten by prune, read again;
- ONE transaction for real: the progress half of a plan failing stores nothing;
- boundaries on, not beside: exactly ``reporting_interval`` of new usage is billed; a run seen
  both running (slurmdbd catching up) and final is billed as final;
- the quantity rounding tie (only memory can tie at the 7th decimal);
- month cuts do not depend on the host's time zone.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from slurm_tracker import pipeline
from slurm_tracker.config import Config, config_from_text
from slurm_tracker.errors import TrackerError
from slurm_tracker.events import plan, quantity, request_body
from slurm_tracker.models import ParseResult, PlannedEvent, SkuCharge, UsageSegment
from slurm_tracker.segments import SegmentPolicy, month_starts, new_usage, split
from slurm_tracker.state import State
from tests.conftest import REPO
from tests.factories import T0, record

UTC = timezone.utc
CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")
DAY = 86400


def config(extra: str = "") -> Config:
    return config_from_text(
        "cluster: box\naccounts: {map: {physics: phys}}\npartitions: {map: {compute: CPU}}\n"
        + extra,
        "test",
    )


def events_of(final: bool, elapsed_s: int = 3600, job_id: str = "7") -> list[PlannedEvent]:
    rec = record(job_id=job_id, elapsed_s=elapsed_s, final=final)
    return plan(split(rec, 0, elapsed_s), "physics", [CPU])


def store_plan(store: State, events: list[PlannedEvent], mark: datetime) -> None:
    store.commit_plan(events, [request_body(e) for e in events], mark, mark)


# --- prune ------------------------------------------------------------------------------------


def test_prune_keeps_a_final_run_that_a_window_with_the_overlap_can_still_return(
    tmp_path: Path,
) -> None:
    # mutant: the horizon without the overlap (mark - 1 day) forgets this run, and the next
    # window (mark - 2 days) reads it again with no progress: billed a second time in full
    events = events_of(final=True)
    ended_at = T0 + timedelta(seconds=3600)
    mark = ended_at + timedelta(hours=36)
    with State.open(tmp_path / "state.db") as store:
        store_plan(store, events, mark)
        assert store.prune(mark, 2 * DAY, 30 * DAY) == (0, 0)
        assert store.reported([events[0].run]) == {events[0].run: 3600}
        assert store.pruned_before() is None


def test_prune_never_forgets_a_running_run(tmp_path: Path) -> None:
    # mutant: prune without "final=1" forgets running runs whose last billed step is old
    events = events_of(final=False, elapsed_s=1800)
    assert not events[0].final
    mark = T0 + timedelta(days=30)
    with State.open(tmp_path / "state.db") as store:
        store_plan(store, events, mark)
        assert store.prune(mark, 3600, 30 * DAY) == (0, 0)
        assert store.reported([events[0].run]) == {events[0].run: 1800}


def test_a_long_suspended_run_billed_in_steps_is_not_billed_again_once_pruned(
    tmp_path: Path,
) -> None:
    # Suspended for days: ElapsedRaw (billed) is far shorter than End - Start. Prune measures
    # the run by start + billed seconds, so it is forgotten while its End still falls inside
    # the next window. Mutant: plan_usage's "forgotten" test by End (or none at all) bills it
    # again under the same keys... or new ones once the steps differ.
    now = datetime(2026, 3, 20, tzinfo=UTC)
    start = now - timedelta(days=3)
    cfg = config("reporting_interval: 15m\n")
    running = record(job_id="88", start_at=start, elapsed_s=1800, final=False)
    final = replace(
        record(job_id="88", start_at=start, elapsed_s=3600),
        end_at=now - timedelta(minutes=10),
    )
    with State.open(tmp_path / "state.db") as store:
        step = pipeline.plan_usage(ParseResult((running,), ()), {}, cfg)
        pipeline.commit(store, step, start + timedelta(hours=2), start + timedelta(hours=2))
        rest = pipeline.plan_usage(
            ParseResult((final,), ()), store.reported([final.run]), cfg, now_at=now
        )
        assert len(step.events) == len(rest.events) == 1  # billed in two steps, 4 cores x 1 h
        assert sum(e.quantity for e in step.events + rest.events) == Decimal(4)
        pipeline.commit(store, rest, now, now)
        removed, _ = store.prune(now, 3600, 30 * DAY)
        assert removed == 1  # start + 1 h billed is before the horizon; its End is not
        again = pipeline.plan_usage(
            ParseResult((final,), ()),
            store.reported([final.run]),
            cfg,
            now_at=now,
            forgotten_before=store.pruned_before(),
        )
    assert again.events == ()
    assert "no longer remembers what was billed" in again.skipped[0].reason


# --- one transaction --------------------------------------------------------------------------


def test_a_plan_whose_progress_cannot_be_stored_stores_nothing(tmp_path: Path) -> None:
    # mutant: the outbox and the progress committed apart (each statement on its own)
    path = tmp_path / "state.db"
    State.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER refuse_progress BEFORE INSERT ON progress "
        "BEGIN SELECT RAISE(ABORT, 'progress refused'); END"
    )
    conn.commit()
    conn.close()
    events = events_of(final=True)
    mark = T0 + timedelta(hours=2)
    with State.open(path) as store:
        with pytest.raises((sqlite3.Error, TrackerError), match="progress refused"):
            store_plan(store, events, mark)
        assert store.to_send() == []
        assert store.counts() == dict.fromkeys(store.counts(), 0)
        assert store.high_water_at() is None
        assert store.reported([events[0].run]) == {}


# --- boundaries -------------------------------------------------------------------------------


def test_a_running_run_with_exactly_the_interval_of_new_usage_is_billed() -> None:
    # mutant: "fresh_s <= reporting_interval_s" waits one more sync
    policy = SegmentPolicy(reporting_interval_s=900)
    running = record(elapsed_s=900, final=False)
    segments = new_usage(running, 0, policy)
    assert isinstance(segments, list)
    assert [(s.from_s, s.to_s) for s in segments] == [(0, 900)]
    later = record(elapsed_s=1800, final=False)
    step = new_usage(later, 900, policy)
    assert isinstance(step, list)
    assert [(s.from_s, s.to_s) for s in step] == [(900, 1800)]


def test_a_run_seen_running_and_final_is_billed_as_final() -> None:
    # slurmdbd catching up: the same run as RUNNING (ElapsedRaw growing with the clock, 5000)
    # and as final (4000). Mutant: the longer record wins and 1000 s too many are billed.
    start = T0
    running = record(job_id="9", start_at=start, elapsed_s=5000, final=False)
    final = record(job_id="9", start_at=start, elapsed_s=4000, final=True)
    cfg = config("reporting_interval: 1m\n")
    for order in ((running, final), (final, running)):
        planned = pipeline.plan_usage(ParseResult(order, ()), {}, cfg)
        assert sum(e.quantity for e in planned.events) == Decimal("4.444444")  # 4 x 4000 s
        assert max(e.to_s for e in planned.events) == 4000
        assert all(e.final for e in planned.events if e.to_s == 4000)


# --- rounding ---------------------------------------------------------------------------------


def test_a_memory_quantity_on_a_tie_rounds_half_even() -> None:
    # 1000 MiB x 144 s = 0.0390625 GB-hours exactly: a tie at the 7th decimal, rounded to the
    # even 0.039062 (mutant: half-up gives 0.039063)
    rec = record(mem_mb=1000, elapsed_s=144)
    segment = UsageSegment(rec, 0, 144, T0, T0 + timedelta(seconds=144))
    assert rec.tres.count("mem") * 144 / 3600 == Decimal("0.0390625")
    assert quantity(segment, SkuCharge("MEM", "mem")) == Decimal("0.039062")
    odd = record(mem_mb=3000, elapsed_s=144)  # 0.1171875: the tie goes up to the even 0.117188
    segment = UsageSegment(odd, 0, 144, T0, T0 + timedelta(seconds=144))
    assert quantity(segment, SkuCharge("MEM", "mem")) == Decimal("0.117188")


# --- the host's time zone -----------------------------------------------------------------------

ZONES = ["Pacific/Kiritimati", "America/St_Johns", "Asia/Kathmandu", "Pacific/Pago_Pago"]


@pytest.fixture(params=ZONES)
def host_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The process runs in a non-UTC local time zone (as a login node may)."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available on this platform")
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    try:
        yield request.param
    finally:
        monkeypatch.undo()
        time.tzset()


def test_month_cuts_are_utc_whatever_the_host_zone(host_zone: str) -> None:
    # mutant: month starts in local time (astimezone() / a naive datetime): cuts move by the
    # zone's offset, and events cross billing periods
    assert time.localtime(0).tm_gmtoff != 0 or host_zone == "UTC"
    start = datetime(2026, 1, 31, 20, tzinfo=UTC)
    assert month_starts(start, start + timedelta(days=2)) == [datetime(2026, 2, 1, tzinfo=UTC)]
    rec = record(start_at=start, elapsed_s=8 * 3600)
    pieces = split(rec, 0, rec.elapsed_s)
    assert [(p.started_at, p.ended_at) for p in pieces] == [
        (start, datetime(2026, 2, 1, tzinfo=UTC)),
        (datetime(2026, 2, 1, tzinfo=UTC), start + timedelta(hours=8)),
    ]
    events = plan(pieces, "physics", [CPU])
    assert [request_body(e)["endedAt"] for e in events] == [
        "2026-02-01T00:00:00Z",
        "2026-02-01T04:00:00Z",
    ]


def test_the_segment_tests_pass_in_a_non_utc_host_zone() -> None:
    env = {**os.environ, "TZ": "Pacific/Kiritimati"}  # UTC+14: every local date differs
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_segments.py"],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
