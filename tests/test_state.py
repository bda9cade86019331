from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker.errors import LockHeld, StateError
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import PlannedEvent, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import SCHEMA_VERSION, State, StateLock
from tests.factories import record

NOW = datetime(2026, 3, 11, tzinfo=timezone.utc)
CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")


def events_for(
    job_id: str = "1", from_s: int = 0, to_s: int = 3600, final: bool = True
) -> list[PlannedEvent]:
    rec = record(job_id=job_id, elapsed_s=to_s, final=final)
    return plan(split(rec, from_s, to_s), "physics-2026", [CPU])


def store_events(store: State, events: list[PlannedEvent], hwm: datetime | None = None) -> int:
    return store.commit_plan(events, [request_body(e) for e in events], NOW, hwm)


def test_new_file_is_private_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    with State.open(path) as store:
        assert store.high_water_at() is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )


def test_commit_plan_stores_outbox_progress_and_mark_together(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    events = events_for("5", 0, 3600)
    hwm = NOW - timedelta(minutes=2)
    with State.open(path) as store:
        assert store_events(store, events, hwm) == 1
        assert store_events(store, events, hwm - timedelta(hours=1)) == 0  # same key: no-op
        assert store.high_water_at() == hwm  # never moves back
        run = events[0].run
        assert store.reported([run]) == {run: 3600}
        progress = store.progress(run)
        assert progress is not None and progress.final
        rows = store.to_send()
        assert [r.event_key for r in rows] == [events[0].event_key]
        assert rows[0].body == request_body(events[0])
        assert not rows[0].needs_lookup


def test_a_failing_transaction_stores_nothing(tmp_path: Path) -> None:
    events = events_for("6") + events_for("16")
    with State.open(tmp_path / "s.db") as store:
        with pytest.raises(TypeError):  # the second body cannot be stored
            store.commit_plan(events, [request_body(events[0]), {"bad": object()}], NOW, NOW)
        assert store.to_send() == []
        assert store.reported([e.run for e in events]) == {}
        assert store.high_water_at() is None


def test_outbox_transitions(tmp_path: Path) -> None:
    a, b = events_for("7")[0], events_for("8")[0]
    with State.open(tmp_path / "s.db") as store:
        store_events(store, [a, b])
        store.mark_sending(a.event_key, NOW)
        (row_a, _) = store.to_send()
        assert row_a.status == "sending" and row_a.attempts == 1 and row_a.needs_lookup
        store.mark_pending(a.event_key, "timeout", True, NOW)
        store.mark_pending(a.event_key, "refused", False, NOW)  # unknown-outcome is sticky
        assert store.to_send()[0].needs_lookup
        store.mark_acked(a.event_key, "evt-1", NOW)
        store.mark_dead(b.event_key, "HTTP 400: bad sku", NOW)
        assert store.counts()["acked"] == 1 and store.counts()["dead"] == 1
        assert store.to_send() == []
        assert store.retry(None, NOW) == 1
        assert store.to_send()[0].event_key == b.event_key
        store.mark_dead(b.event_key, "again", NOW)
        assert store.drop([b.event_key], NOW) == 1
        assert store.counts()["dropped"] == 1


def test_prune_forgets_old_final_runs_and_old_acked_events(tmp_path: Path) -> None:
    old = events_for("9")
    with State.open(tmp_path / "s.db") as store:
        store_events(store, old, NOW)
        store.mark_acked(old[0].event_key, "x", NOW - timedelta(days=40))
        # the run ended 2026-03-10 13:00; mark at NOW: inside overlap + 1 day margin -> kept
        assert store.prune(NOW, 3600, 30 * 86400) == (0, 1)
        assert store.reported([old[0].run])
        store.commit_plan([], [], NOW, NOW + timedelta(days=5))
        assert store.prune(NOW + timedelta(days=5), 3600, 30 * 86400) == (1, 0)
        assert store.reported([old[0].run]) == {}
        assert store.pruned_before() is not None


def test_readonly_never_writes_and_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State.open(path, readonly=True) as store:
        assert store.high_water_at() is None
        with pytest.raises(StateError, match="read-only"):
            store_events(store, events_for())
    assert not path.exists()
    with State.open(path) as store:
        store_events(store, events_for(), NOW)
    before = path.read_bytes()
    files = sorted(p.name for p in tmp_path.iterdir())
    with State.open(path, readonly=True) as store:
        assert store.high_water_at() == NOW
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # not even -wal/-shm files


def test_readonly_sees_commits_still_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State.open(path) as writer:  # a sync in progress: its commits sit in the -wal
        store_events(writer, events_for(), NOW)
        assert (tmp_path / "state.db-wal").exists()
        with State.open(path, readonly=True) as reader:
            assert reader.high_water_at() == NOW
            assert len(reader.to_send()) == 1


def test_path_with_uri_characters(tmp_path: Path) -> None:
    path = tmp_path / "odd ?#% name.db"
    with State.open(path) as store:
        store_events(store, events_for(), NOW)
    with State.open(path, readonly=True) as store:
        assert store.high_water_at() == NOW


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not sqlite" * 100, "cannot be used"), (None, "newer than this")],
)
def test_refuses_corrupt_or_newer_files(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "state.db"
    if content is None:
        with State.open(path):
            pass
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(content)
    with pytest.raises(StateError, match=message):
        State.open(path)


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, datetime as d; from pathlib import Path;"
            "from slurm_tracker.state import StateLock;"
            "l = StateLock(Path(sys.argv[1])); l.acquire(d.datetime.now(d.timezone.utc));"
            "print('held', flush=True); time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            StateLock(path).acquire(NOW)
    finally:
        holder.kill()
        holder.wait()
    with StateLock(path) as lock:  # free again once the holder is gone
        lock.acquire(NOW)
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
