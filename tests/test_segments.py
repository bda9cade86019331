from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.models import Skipped
from slurm_tracker.segments import SegmentPolicy, cut_points, month_starts, new_usage, split
from tests.factories import record

UTC = timezone.utc
POLICY = SegmentPolicy(reporting_interval_s=900)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 20, tzinfo=UTC), []),
        (
            datetime(2026, 1, 31, 23, tzinfo=UTC),
            datetime(2026, 2, 1, 1, tzinfo=UTC),
            [datetime(2026, 2, 1, tzinfo=UTC)],
        ),
        (
            datetime(2025, 12, 15, tzinfo=UTC),
            datetime(2026, 2, 2, tzinfo=UTC),
            [datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)],
        ),
        # a boundary exactly at the end is not inside
        (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), []),
    ],
)
def test_month_starts(start: datetime, end: datetime, expected: list[datetime]) -> None:
    assert month_starts(start, end) == expected


def test_cut_points_merge_extra_instants() -> None:
    start = datetime(2026, 6, 30, 20, tzinfo=UTC)
    end = datetime(2026, 7, 1, 4, tzinfo=UTC)
    rule = datetime(2026, 6, 30, 22, tzinfo=UTC)
    outside = datetime(2026, 7, 2, tzinfo=UTC)
    assert cut_points(start, end, [rule, outside, datetime(2026, 7, 1, tzinfo=UTC)]) == [
        rule,
        datetime(2026, 7, 1, tzinfo=UTC),
    ]


@pytest.mark.parametrize(
    ("kwargs", "reported", "reason"),
    [
        ({"start_at": None, "elapsed_s": 0, "final": False}, 0, "not started"),
        ({"elapsed_s": 0}, 0, "zero elapsed"),
        ({"elapsed_s": 600}, 600, "no new usage"),
        ({"elapsed_s": 600}, 900, "never taken back"),
        ({"elapsed_s": 600, "final": False}, 0, "running: 600 s"),
        ({"elapsed_s": 1500, "final": False}, 1000, "running: 500 s"),
    ],
)
def test_nothing_to_bill(kwargs: dict[str, object], reported: int, reason: str) -> None:
    result = new_usage(record(**kwargs), reported, POLICY)  # type: ignore[arg-type]
    assert isinstance(result, Skipped)
    assert reason in result.reason


def test_running_run_billed_once_interval_reached_and_final_flushes() -> None:
    running = record(elapsed_s=1000, final=False)
    segs = new_usage(running, 0, POLICY)
    assert isinstance(segs, list)
    assert [(s.from_s, s.to_s) for s in segs] == [(0, 1000)]
    done = record(elapsed_s=1010, final=True)
    tail = new_usage(done, 1000, POLICY)
    assert isinstance(tail, list)
    assert [(s.from_s, s.to_s) for s in tail] == [(1000, 1010)]
    assert tail[0].started_at == done.start_at + timedelta(seconds=1000)  # type: ignore[operator]


def test_cut_at_month_boundary() -> None:
    start = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    segs = split(record(start_at=start, elapsed_s=7200), 0, 7200)
    assert [(s.from_s, s.to_s) for s in segs] == [(0, 3600), (3600, 7200)]
    assert segs[0].ended_at == datetime(2026, 2, 1, tzinfo=UTC) == segs[1].started_at


starts = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))


@settings(max_examples=200, deadline=None)
@given(
    start=starts,
    elapsed=st.integers(1, 120 * 86400),
    reported_fraction=st.floats(0, 1),
    extra=st.lists(st.integers(0, 120 * 86400), max_size=5),
)
def test_segments_tile_the_new_usage(
    start: datetime, elapsed: int, reported_fraction: float, extra: list[int]
) -> None:
    reported = int(elapsed * reported_fraction)
    rec = record(start_at=start, elapsed_s=elapsed)
    cuts = [start + timedelta(seconds=s) for s in extra]
    segs = new_usage(rec, reported, POLICY, cuts)
    if reported == elapsed:
        assert isinstance(segs, Skipped)
        return
    assert isinstance(segs, list)
    # contiguous, non-overlapping, in order, adding up to exactly the new seconds
    assert segs[0].from_s == reported and segs[-1].to_s == elapsed
    for a, b in zip(segs, segs[1:]):
        assert a.to_s == b.from_s and a.ended_at == b.started_at
    assert sum(s.seconds for s in segs) == elapsed - reported
    for s in segs:
        assert s.seconds > 0
        # each piece lies within one UTC month
        last = s.ended_at - timedelta(seconds=1)
        assert (s.started_at.year, s.started_at.month) == (last.year, last.month)
        # and never straddles an extra cut
        assert not any(s.started_at < c < s.ended_at for c in cuts)


@settings(max_examples=200, deadline=None)
@given(
    start=starts,
    history=st.lists(st.integers(1, 40 * 86400), min_size=1, max_size=8),
    interval=st.sampled_from([0, 60, 900, 3600]),
)
def test_replaying_any_prefix_then_the_rest_gives_one_pass_total(
    start: datetime, history: list[int], interval: int
) -> None:
    """Syncs at arbitrary points of a run's life bill exactly what one final sync would."""
    policy = SegmentPolicy(interval)
    observed = sorted(history)
    reported = 0
    billed = []
    for i, elapsed in enumerate(observed):
        final = i == len(observed) - 1
        segs = new_usage(record(start_at=start, elapsed_s=elapsed, final=final), reported, policy)
        if isinstance(segs, list):
            billed += segs
            reported = segs[-1].to_s
    one_pass = new_usage(record(start_at=start, elapsed_s=observed[-1]), 0, policy)
    assert isinstance(one_pass, list)
    assert sum(s.seconds for s in billed) == sum(s.seconds for s in one_pass) == observed[-1]
    spans = [(s.from_s, s.to_s) for s in billed]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_the_last_seconds_of_running_runs_are_held_back() -> None:
    """While slurmdbd catches up, sacct shows ended jobs as running with an ElapsedRaw that
    grows with the clock: only what was consumed a lag ago is billed."""
    policy = SegmentPolicy(0, holdback_s=60)
    running = record(elapsed_s=100, final=False)
    segs = new_usage(running, 0, policy)
    assert isinstance(segs, list) and segs[-1].to_s == 40
    assert isinstance(new_usage(record(elapsed_s=100, final=False), 40, policy), Skipped)
    assert isinstance(new_usage(record(elapsed_s=50, final=False), 0, policy), Skipped)
    # a final run is billed in full: its ElapsedRaw is settled
    done = new_usage(record(elapsed_s=100, final=True), 40, policy)
    assert isinstance(done, list) and (done[0].from_s, done[-1].to_s) == (40, 100)


def test_a_running_run_within_the_hold_back_says_so() -> None:
    # A first-ever dry run used to say "no new usage since the last sync" for these.
    policy = SegmentPolicy(reporting_interval_s=60, holdback_s=120)
    young = new_usage(record(final=False, elapsed_s=90), 0, policy)
    assert isinstance(young, Skipped)
    assert young.reason == (
        "running: its last 90 s are held back for sacct.lag (120 s: slurmdbd may still be "
        "catching up)"
    )
    billed = new_usage(record(final=False, elapsed_s=1000), 880, policy)
    assert isinstance(billed, Skipped) and "last 120 s are held back" in billed.reason
    done = new_usage(record(final=True, elapsed_s=1000), 1000, policy)
    assert isinstance(done, Skipped) and done.reason == "no new usage since the last sync"
