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
from slurm_tracker.state import (
    APPLICATION_ID,
    QUARANTINE_TEXT_MAX,
    SCHEMA_VERSION,
    QuarantineEntry,
    QuarantineRow,
    State,
    StateLock,
)
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


# ---------------------------------------------------------------------- schema 2
V1_DDL = (  # the schema of version 1 as it was released, verbatim
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE progress (
        run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
        reported_s INTEGER NOT NULL,   -- elapsed seconds billed so far
        last_end_at INTEGER NOT NULL,  -- wall-clock end of the last billed segment (epoch)
        final INTEGER NOT NULL,        -- the run has ended and is fully billed
        updated_at INTEGER NOT NULL
    )""",
    """CREATE TABLE outbox (
        event_key TEXT PRIMARY KEY,
        allocation TEXT NOT NULL,
        sku TEXT NOT NULL,
        quantity TEXT NOT NULL,        -- decimal text
        started_at INTEGER NOT NULL,
        ended_at INTEGER NOT NULL,
        body TEXT NOT NULL,            -- the JSON request body
        status TEXT NOT NULL CHECK (status IN
            ('pending', 'sending', 'acked', 'dead', 'dropped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        outcome_unknown INTEGER NOT NULL DEFAULT 0,  -- an earlier attempt may have landed
        last_error TEXT NOT NULL DEFAULT '',
        event_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )""",
    "CREATE INDEX outbox_status ON outbox (status, created_at)",
    """CREATE TABLE syncs (
        id INTEGER PRIMARY KEY,
        started_at INTEGER NOT NULL,
        finished_at INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        summary TEXT NOT NULL          -- JSON counts
    )""",
)
V1_TABLES = ("meta", "progress", "outbox", "syncs")


def _v1_file(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """A state file as version 1 wrote it (no application id), with rows in every table."""
    conn = sqlite3.connect(path)
    for sql in V1_DDL:
        conn.execute(sql)
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema_version", "1"), ("high_water_at", "1773180000"), ("pruned_before", "1772000000")],
    )
    conn.executemany(
        "INSERT INTO progress VALUES (?, ?, ?, ?, ?)",
        [("box:7:1773100000", 3600, 1773103600, 1, 1773180000), ("box:8:1773100000", 60, 1, 0, 2)],
    )
    for n, status in enumerate(("pending", "sending", "acked", "dead", "dropped")):
        conn.execute(
            "INSERT INTO outbox VALUES (?, 'physics', 'SLURM_CPU_HOUR', ?, 1, 2, ?, ?, ?, ?, ?, ?,"
            " 1773100000, 1773100001)",
            (
                f"st1:box:{n}",
                f"{n}.250000",
                f'{{"quantity": {n}}}',
                status,
                n,
                n % 2,
                "HTTP 400" if status == "dead" else "",
                "evt-2" if status == "acked" else None,
            ),
        )
    conn.execute("INSERT INTO syncs VALUES (1, 10, 20, 'ok', '{\"events\": 5}')")
    conn.commit()
    rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in V1_TABLES}
    conn.close()
    path.chmod(0o600)
    return rows


def test_migration_from_schema_1_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    before = _v1_file(path)
    raw = path.read_bytes()
    with State.open(path, readonly=True) as store:  # a dry run reads it as it is
        assert store.counts() == {
            "pending": 1,
            "held": 0,
            "sending": 1,
            "acked": 1,
            "dead": 1,
            "dropped": 1,
        }
        assert store.quarantine_rows() == [] and store.quarantine_count() == 0
    assert path.read_bytes() == raw
    with State.open(path) as store:
        assert store.high_water_at() == datetime.fromtimestamp(1773180000, timezone.utc)
        assert [r.event_key for r in store.to_send()] == ["st1:box:0", "st1:box:1"]
        assert store.to_send()[1].needs_lookup
        events = events_for("42")
        store.commit_plan(
            events, [request_body(e) for e in events], NOW, held={events[0].event_key}
        )
        assert store.counts()["held"] == 1
    conn = sqlite3.connect(path)
    after = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in V1_TABLES}
    for table in ("outbox", "progress"):  # every old row, unchanged, and the new ones
        assert set(before[table]) < set(after[table])
        assert len(after[table]) == len(before[table]) + 1
    assert after["syncs"] == before["syncs"]
    assert dict(after["meta"])["schema_version"] == str(SCHEMA_VERSION) == "4"
    assert {k: v for k, v in after["meta"] if k != "schema_version"} == {
        k: v for k, v in before["meta"] if k != "schema_version"
    }
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"outbox_status", "quarantine", "quarantine_open"} <= names
    assert "outbox_v2" not in names
    with pytest.raises(sqlite3.IntegrityError):  # the rebuilt CHECK still refuses the unknown
        conn.execute("UPDATE outbox SET status='bogus' WHERE event_key='st1:box:0'")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_held_events_wait_for_an_operator(tmp_path: Path) -> None:
    a, b, c = events_for("7")[0], events_for("8")[0], events_for("9")[0]
    with State.open(tmp_path / "s.db") as store:
        store.commit_plan(
            [a, b, c], [request_body(e) for e in (a, b, c)], NOW, held={b.event_key, c.event_key}
        )
        assert [r.event_key for r in store.to_send()] == [a.event_key]
        assert store.counts()["held"] == 2
        assert {r.event_key for r in store.outbox(("held",))} == {b.event_key, c.event_key}
        assert store.release([b.event_key, "st1:unknown"], NOW) == 1
        assert store.release([b.event_key], NOW) == 0  # already released
        assert {r.event_key for r in store.to_send()} == {a.event_key, b.event_key}
        # planned again (the same key) while held or pending: left as it is
        assert store.commit_plan([c, a], [request_body(c), request_body(a)], NOW, held=()) == 0
        assert store.counts()["held"] == 1
        assert store.release(None, NOW) == 1
        assert store.counts()["held"] == 0 and len(store.to_send()) == 3
        store.mark_acked(a.event_key, "x", NOW)
        assert store.release(None, NOW) == 0  # only held events move


def test_quarantine_is_stored_with_the_plan_and_resolved(tmp_path: Path) -> None:
    first = QuarantineEntry("box:1:100", "1", "End before Start", "1|box|...")
    second = QuarantineEntry("sha256:ab12", "?", "7 fields, 30 expected", "x" * 5000)
    later = NOW + timedelta(hours=1)
    with State.open(tmp_path / "s.db") as store:
        store.commit_plan([], [], NOW, NOW, quarantine=[first, second, first])
        rows = store.quarantine_rows()
        assert [r.key for r in rows] == ["box:1:100", "sha256:ab12"]
        assert rows[0] == QuarantineRow(
            "box:1:100", "1", "End before Start", "1|box|...", NOW, NOW, 1, None
        )
        assert len(rows[1].text) == QUARANTINE_TEXT_MAX
        assert store.quarantine_count() == 2
        # seen again with another reason; the second one billed meanwhile (resolved)
        again = QuarantineEntry("box:1:100", "1", "Start before Submit", "1|box|..2")
        store.commit_plan([], [], later, quarantine=[again], resolved=["sha256:ab12", "nope"])
        assert store.quarantine_count() == 1
        (row,) = store.quarantine_rows()
        assert (row.reason, row.text, row.times_seen) == ("Start before Submit", "1|box|..2", 2)
        assert (row.first_seen_at, row.last_seen_at, row.resolved_at) == (NOW, later, None)
        resolved = store.quarantine_rows(include_resolved=True)[1]
        assert resolved.key == "sha256:ab12" and resolved.resolved_at == later
        # a resolved record that turns bad again is open again
        store.commit_plan([], [], later, quarantine=[second])
        assert store.quarantine_count() == 2
        store.commit_plan([], [], later, resolved=["sha256:ab12"])
        # a failing plan stores no quarantine either
        events = events_for("3")
        with pytest.raises(TypeError):
            store.commit_plan(
                events,
                [{"bad": object()}],
                later,
                quarantine=[QuarantineEntry("k", "3", "r", "t")],
                resolved=["box:1:100"],
            )
        assert [r.key for r in store.quarantine_rows()] == ["box:1:100"]
        # prune forgets resolved entries older than the retention, never open ones
        assert store.prune(later + timedelta(days=29), 3600, 30 * 86400) == (0, 0)
        assert len(store.quarantine_rows(include_resolved=True)) == 2
        store.prune(later + timedelta(days=31), 3600, 30 * 86400)
        assert [r.key for r in store.quarantine_rows(include_resolved=True)] == ["box:1:100"]


def test_commit_plan_needs_one_body_per_event(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store, pytest.raises(ValueError, match="bodies"):
        store.commit_plan(events_for("1"), [], NOW)


def test_the_mark_never_moves_past_the_real_clock(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store:
        before = datetime.now(timezone.utc).replace(microsecond=0)
        store.commit_plan([], [], NOW, datetime(2099, 1, 1, tzinfo=timezone.utc))  # --now typo
        mark = store.high_water_at()
        assert mark is not None and before <= mark <= datetime.now(timezone.utc)
        store.commit_plan([], [], NOW, NOW)  # and it still never moves back
        assert store.high_water_at() == mark


def test_set_high_water_repairs_the_mark_within_what_is_remembered(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store:
        assert store.set_high_water(NOW - timedelta(days=1), NOW) is None
        assert store.high_water_at() == NOW - timedelta(days=1)
        with pytest.raises(StateError, match="after now"):
            store.set_high_water(NOW + timedelta(seconds=1), NOW)
        with pytest.raises(StateError, match="after now"):  # the real clock bounds it too
            store.set_high_water(
                datetime(2099, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc)
            )
        # a wrong mark far ahead (written before the clamp existed) is moved back
        store.commit_plan([], [], NOW, NOW)
        assert store.set_high_water(NOW - timedelta(days=2), NOW) == NOW
        assert store.high_water_at() == NOW - timedelta(days=2)
        # runs that ended before pruned_before are forgotten: a window from before then is refused
        events = events_for("9")  # ended 2026-03-10 13:00
        store_events(store, events, NOW)
        store.prune(NOW, 3600, 30 * 86400)
        store.commit_plan([], [], NOW, NOW + timedelta(days=5))
        store.prune(NOW + timedelta(days=5), 3600, 30 * 86400)
        pruned = store.pruned_before()
        assert pruned is not None
        with pytest.raises(StateError, match="bill them a second time"):
            store.set_high_water(
                pruned + timedelta(minutes=30), NOW + timedelta(days=5), overlap_s=3600
            )
        with pytest.raises(StateError, match="pruned"):
            store.set_high_water(pruned - timedelta(seconds=1), NOW + timedelta(days=5))
        assert store.high_water_at() == NOW + timedelta(days=5)  # unchanged by refusals
        store.set_high_water(pruned + timedelta(hours=1), NOW + timedelta(days=5), overlap_s=3600)
        assert store.high_water_at() == pruned + timedelta(hours=1)
    with (
        State.open(tmp_path / "s.db", readonly=True) as store,
        pytest.raises(StateError, match="read-only"),
    ):
        store.set_high_water(NOW, NOW)
