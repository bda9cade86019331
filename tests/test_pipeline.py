"""Orchestration (slurm_tracker/pipeline.py): the window, commits, and the clock passed in."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker import pipeline
from slurm_tracker.api import AllocationsClient
from slurm_tracker.config import SacctConfig, config_from_text
from slurm_tracker.errors import StateError
from slurm_tracker.state import State
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE, FakeApi, serving

UTC = timezone.utc
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)  # months before the real clock


@pytest.mark.parametrize(
    ("high_water", "first", "expected_start"),
    [
        (None, None, datetime(2026, 5, 1, 11, 58, tzinfo=UTC) - timedelta(days=1)),
        (None, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
        (datetime(2026, 5, 1, 11, 0, tzinfo=UTC), None, datetime(2026, 5, 1, 10, 0, tzinfo=UTC)),
    ],
)
def test_sync_window(
    high_water: datetime | None, first: datetime | None, expected_start: datetime
) -> None:
    cfg = SacctConfig(lag_s=120, overlap_s=3600, first_sync_start=first)
    window = pipeline.sync_window(datetime(2026, 5, 1, 12, 0, tzinfo=UTC), high_water, cfg)
    assert window == pipeline.Window(expected_start, datetime(2026, 5, 1, 11, 58, tzinfo=UTC))


# --- the clock is passed in: every reading of the time comes from ``clock`` -----------------

CONFIG = config_from_text(
    """
cluster: box
api: {organization: org}
accounts: {map: {physics: physics-2026}}
partitions: {map: {compute: SLURM_CPU_HOUR}}
""",
    "test",
)


def pinned(at: datetime) -> pipeline.Clock:
    return lambda: at


def test_commit_caps_the_mark_at_the_clock_passed_in(tmp_path: Path) -> None:
    with State.open(tmp_path / "state.db") as store:
        empty = pipeline.Plan((), (), ())
        pipeline.commit(store, empty, T0, T0 + timedelta(hours=1), clock=pinned(T0))
        assert store.high_water_at() == T0  # the real clock would allow T0 + 1 h


def test_a_mark_ahead_of_the_clock_passed_in_is_refused(tmp_path: Path) -> None:
    with State.open(tmp_path / "state.db") as store:
        pipeline.commit(store, pipeline.Plan((), (), ()), T0, T0, clock=pinned(T0))
        assert pipeline.check_mark(store, CONFIG, clock=pinned(T0)) == T0
        with pytest.raises(StateError, match="in the future"):
            pipeline.check_mark(store, CONFIG, clock=pinned(T0 - timedelta(hours=1)))


def capture(tmp_path: Path) -> Path:
    """One run of job 7 on 4 CPUs from T0 - 2 h to T0 - 1 h."""
    start = int((T0 - timedelta(hours=2)).timestamp())
    row = {
        "JobID": "7",
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(start - 60),
        "Start": str(start),
        "End": str(start + 3600),
        "ElapsedRaw": "3600",
        "State": "COMPLETED",
        "AllocTRES": "billing=4,cpu=4,mem=1G,node=1",
    }
    path = tmp_path / "sacct.txt"
    path.write_bytes(live_capture([row]))
    return path


def sync_at(tmp_path: Path, clock_at: datetime) -> pipeline.SyncResult:
    client = AllocationsClient(
        BASE, "org", "pwt_test.secret", sleep=lambda _s: None, max_attempts=1
    )
    request = pipeline.SyncRequest(clock_at, str(capture(tmp_path)), None, io.BytesIO(), {})
    with State.open(tmp_path / "state.db") as store:
        return pipeline.sync_once(CONFIG, store, client, None, request, clock=pinned(clock_at))


def test_a_sync_reads_the_time_from_the_clock_passed_in(tmp_path: Path) -> None:
    api = FakeApi()
    with serving(api):
        early = sync_at(tmp_path, T0 - timedelta(hours=3))  # the run ends in its future
        assert not early.plan.events and not api.events
        (rejected,) = early.plan.rejected
        assert "is in the future" in rejected.reason
        later = sync_at(tmp_path, T0)
    assert later.new_events == 1 and api.jobs() == ["7"]
    with State.open(tmp_path / "state.db") as store:
        finished = [s["finishedAt"] for s in store.recent_syncs()]
        assert finished == [T0, T0 - timedelta(hours=3)]
        assert store.ledger_checked_at() == T0  # the API's record compared
        (acked,) = store.outbox(("acked",))
        assert acked.updated_at == T0  # delivered
        # pruned on the same clock: the entry resolved at T0 is kept 30 days after it
        assert len(store.quarantine_rows(include_resolved=True)) == 1


def test_commit_stream_caps_the_mark_at_the_clock_passed_in(tmp_path: Path) -> None:
    with State.open(tmp_path / "state.db") as store:
        batches = [pipeline.Plan((), (), ()), pipeline.Plan((), (), ())]
        pipeline.commit_stream(store, batches, T0, T0 + timedelta(hours=1), clock=pinned(T0))
        assert store.high_water_at() == T0


def test_a_live_sync_caps_the_mark_at_the_clock_passed_in(tmp_path: Path) -> None:
    fake = write_fake_sacct(tmp_path / "sacct", capture(tmp_path))
    config = config_from_text(
        f"cluster: box\napi: {{organization: org}}\nsacct: {{path: '{fake}', lag: 5m}}\n"
        "accounts: {map: {physics: physics-2026}}\npartitions: {map: {compute: SLURM_CPU_HOUR}}\n",
        "test",
    )
    client = AllocationsClient(BASE, "org", "pwt_test.secret", sleep=lambda _s: None)
    request = pipeline.SyncRequest(T0, None, None, io.BytesIO(), {})
    clock_at = T0 - timedelta(minutes=10)  # the window ends at T0 - 5 min
    with serving(FakeApi()), State.open(tmp_path / "state.db") as store:
        pipeline.sync_once(config, store, client, None, request, clock=pinned(clock_at))
        assert store.high_water_at() == clock_at


def test_a_sync_and_a_dry_run_refuse_a_mark_ahead_of_the_clock_passed_in(tmp_path: Path) -> None:
    with State.open(tmp_path / "state.db") as store:
        pipeline.commit(store, pipeline.Plan((), (), ()), T0, T0, clock=pinned(T0))
    with pytest.raises(StateError, match="in the future"):
        sync_at(tmp_path, T0 - timedelta(hours=1))
    with State.open(tmp_path / "state.db", readonly=True) as store, pytest.raises(StateError):
        dry_at(tmp_path, store, T0 - timedelta(hours=1))


def test_a_dry_run_reads_the_time_from_the_clock_passed_in(tmp_path: Path) -> None:
    with State.open(tmp_path / "state.db", readonly=True) as store:
        (plan,) = list(dry_at(tmp_path, store, T0 - timedelta(hours=3)).plans)
    assert not plan.events and "is in the future" in plan.rejected[0].reason


def dry_at(tmp_path: Path, store: State, clock_at: datetime) -> pipeline.DryRun:
    return pipeline.dry_run(
        CONFIG,
        store,
        None,
        now_at=T0,
        sacct_file=str(capture(tmp_path)),
        fields=None,
        stdin=io.BytesIO(),
        environ={},
        agent="test",
        clock=pinned(clock_at),
    )
