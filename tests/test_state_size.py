"""The state file stays small (schema version 4, issue 10): acknowledged events compacted and
pruned once the ledger check no longer needs their keys, their totals counted as they are
acknowledged, progress pruned on the --sacct-file path too, free pages given back; and the
migration from a real version-3 file."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from slurm_tracker import state
from slurm_tracker.errors import StateError, StateUnavailable
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import PlannedEvent, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import OutboxUpdate, State
from tests.factories import T0, record

NOW = datetime(2026, 3, 11, tzinfo=timezone.utc)
CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")
ALLOCATION = "physics-2026"
PAIR = (ALLOCATION, "SLURM_CPU_HOUR")

#: A version-3 state file written by slurm-tracker 0.2.0's own code (commit 096a212, the
#: release before schema version 4): progress of final and running runs; outbox rows in every
#: status (acked ones folded into the metrics' totals and one acked after that fold, an adopted
#: one, one sending after a crash, one with an unknown outcome, a held, a dead and a dropped
#: one); a quarantined record, an open correction, a sync, a floor, a backfill's progress.
V3_FILE = Path(__file__).parent / "data" / "state-v3.sqlite"
TABLES = ("meta", "progress", "outbox", "syncs", "quarantine", "corrections")


def events_for(
    job_id: str, to_s: int = 3600, final: bool = True, start_at: datetime = T0
) -> list[PlannedEvent]:
    rec = record(job_id=job_id, elapsed_s=to_s, final=final, start_at=start_at)
    return plan(split(rec, 0, to_s), ALLOCATION, [CPU])


def store_events(store: State, events: list[PlannedEvent], mark: datetime | None = None) -> int:
    return store.commit_plan(events, [request_body(e) for e in events], NOW, mark)


def acked(key: str) -> OutboxUpdate:
    return OutboxUpdate(key, "acked", event_id=f"id-{key}")


def rows_of(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
    finally:
        conn.close()


def v3_copy(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    shutil.copyfile(V3_FILE, path)
    path.chmod(0o600)
    return path


def grouped(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], tuple[int, Decimal]]:
    """(events, quantity) per (allocation, SKU) of outbox rows."""
    out: dict[tuple[str, str], tuple[int, Decimal]] = {}
    for r in rows:
        n, q = out.get((r[1], r[2]), (0, Decimal(0)))
        out[(r[1], r[2])] = (n + 1, q + Decimal(r[3]))
    return out


# ------------------------------------------------------------------------ migration from 3


def test_a_real_version_3_file_is_migrated_keeping_every_row(tmp_path: Path) -> None:
    path = v3_copy(tmp_path)
    before = rows_of(path)
    assert dict(before["meta"])["schema_version"] == "3"
    raw = path.read_bytes()
    folded = json.loads(dict(before["meta"])["posted_totals"])["totals"]
    with State.open(path, readonly=True) as store:  # a dry run reads it as it is
        assert store.counts() == {
            "pending": 3,
            "held": 1,
            "sending": 1,
            "acked": 12,
            "dead": 1,
            "dropped": 1,
        }
        assert store.posted_totals() == {(a, s): (n, Decimal(q)) for a, s, n, q in folded}
        assert sum(n for *_, n in store.totals_since(NOW - timedelta(days=30))) == 12
        assert store.outbox_statuses() == {r[0]: r[7] for r in before["outbox"]}
    assert path.read_bytes() == raw

    with State.open(path) as store:
        assert sorted(r.status for r in store.to_send()) == ["pending"] * 3 + ["sending"]
        assert sum(1 for r in store.to_send() if r.needs_lookup) == 2
        posted, planned = store.posted_totals(), store.planned_totals()
    after = rows_of(path)
    for table in TABLES[1:]:  # every row of every table, unchanged
        assert after[table] == before[table], table
    # the metrics' totals moved from meta to their table, with what the last fold had not
    # counted yet (an event acknowledged and one adopted after it)
    moved = dict(before["meta"])
    del moved["posted_totals"], moved["planned_totals"]
    assert dict(after["meta"]) == {**moved, "schema_version": "4"}
    assert posted == grouped([r for r in before["outbox"] if r[7] == "acked"])
    assert planned == grouped(before["outbox"])
    assert sum(n for n, _ in posted.values()) > sum(n for _, _, n, _ in folded)

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # VACUUMed into incremental
    assert conn.execute("PRAGMA application_id").fetchone()[0] == state.APPLICATION_ID
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))
    assert "WITHOUT ROWID" in sql["progress"]
    assert {"progress_pruning", "outbox_settled", "totals", "acked_hours"} <= set(sql)
    assert "progress_v4" not in sql
    conn.close()


def test_the_hours_of_status_are_filled_from_the_acknowledged_rows(tmp_path: Path) -> None:
    path = v3_copy(tmp_path)
    recent = int(datetime.now(timezone.utc).timestamp()) - 7200
    with sqlite3.connect(path) as conn:  # acknowledged two hours ago, not in March
        conn.execute("UPDATE outbox SET updated_at=? WHERE status='acked'", (recent,))
    conn.close()
    acked_rows = [r for r in rows_of(path)["outbox"] if r[7] == "acked"]
    with State.open(path) as store:
        since = datetime.now(timezone.utc) - timedelta(days=1)
        got = {(a, s): (n, q) for a, s, q, n in store.totals_since(since)}
    assert got == grouped(acked_rows)


def test_an_older_agent_refuses_the_migrated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = v3_copy(tmp_path)
    State.open(path).close()
    monkeypatch.setattr(state, "SCHEMA_VERSION", 3)  # what a version-3 agent checks
    for readonly in (False, True):
        with pytest.raises(StateError, match=r"schema version 4, newer than .* upgrade"):
            State.open(path, readonly=readonly)


def test_a_failed_migration_leaves_the_version_3_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = v3_copy(tmp_path)
    before = rows_of(path)

    def fail(cur: sqlite3.Cursor, now: int) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(state, "_carry_counts", fail)
    with pytest.raises(StateUnavailable):
        State.open(path)
    assert rows_of(path) == before  # one transaction: none of the steps before it either
    conn = sqlite3.connect(path)
    assert "totals" not in {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    monkeypatch.undo()
    with State.open(path) as store:
        assert store.counts()["acked"] == 12


# ------------------------------------------------------------------------ compact outbox


def test_an_acknowledged_event_drops_its_body_and_is_counted_once(tmp_path: Path) -> None:
    a, b = events_for("1")[0], events_for("2", 1800)[0]
    path = tmp_path / "s.db"
    with State.open(path) as store:
        assert store_events(store, [a, b]) == 2
        assert store_events(store, [a, b]) == 0  # planned again: not counted again
        assert store.planned_totals() == {PAIR: (2, a.quantity + b.quantity)}
        store.mark_sending_many([a.event_key, b.event_key], NOW)
        store.record_outcomes([acked(a.event_key)], NOW)
        store.record_outcomes([acked(a.event_key)], NOW)  # a second answer: counted once
        store.mark_acked(a.event_key, "id-a", NOW)
        assert store.posted_totals() == {PAIR: (1, a.quantity)}
        (row,) = store.outbox(("acked",))
        assert row.body == {} and row.event_id == "id-a" and row.quantity == a.quantity
        assert store.to_send()[0].body == request_body(b)  # what is still to send keeps it
        assert store.known_keys([a.event_key, b.event_key, "st1:x"]) == {a.event_key, b.event_key}
        assert store.totals_since(NOW - timedelta(hours=1)) == [(*PAIR, a.quantity, 1)]
    with sqlite3.connect(path) as conn:
        bodies = dict(conn.execute("SELECT event_key, body FROM outbox"))
    conn.close()
    assert bodies[a.event_key] == "" and json.loads(bodies[b.event_key]) == request_body(b)


def test_pruning_acknowledged_events_lowers_no_total(tmp_path: Path) -> None:
    events = [e for job in ("1", "2", "3") for e in events_for(job)]
    with State.open(tmp_path / "s.db") as store:
        store_events(store, events, NOW)
        store.record_outcomes([acked(e.event_key) for e in events], NOW)
        later = NOW + timedelta(hours=2)
        store.adopt([], later, checked_at=later)
        counted = store.posted_totals(), store.planned_totals(), store.totals_since(NOW)
        assert counted[0][PAIR][0] == 3
        assert store.prune(later, 3600, 3600) == (0, 3)
        assert store.counts()["acked"] == 0
        assert (store.posted_totals(), store.planned_totals(), store.totals_since(NOW)) == counted


def test_acknowledged_events_are_kept_for_the_next_ledger_check(tmp_path: Path) -> None:
    (event,) = events_for("1")
    with State.open(tmp_path / "s.db") as store:
        store_events(store, [event], NOW)
        store.adopt([], NOW - timedelta(hours=3), checked_at=NOW - timedelta(hours=3))
        store.record_outcomes([acked(event.event_key)], NOW - timedelta(hours=2))
        # the API could not be read since: its next check reads the events created since
        # three hours ago, and must find this key known (not adopt it, nor call it foreign)
        assert store.prune(NOW, 3600, 3600) == (0, 0)
        assert store.known_keys([event.event_key]) == {event.event_key}
        # checked an hour after its acknowledgement: kept an hour more (the retention)...
        store.adopt([], NOW - timedelta(hours=1), checked_at=NOW - timedelta(hours=1))
        assert store.prune(NOW, 3600, 3600) == (0, 0)
        store.adopt([], NOW, checked_at=NOW)  # ...then no longer needed
        assert store.prune(NOW, 3600, 3600) == (0, 1)
        assert store.known_keys([event.event_key]) == set()


def test_dropped_events_keep_their_body_for_thirty_days(tmp_path: Path) -> None:
    dead, gone = events_for("1")[0], events_for("2")[0]
    with State.open(tmp_path / "s.db") as store:
        store_events(store, [dead, gone], NOW)
        store.mark_dead(dead.event_key, "HTTP 400", NOW)
        assert store.drop([dead.event_key], NOW) == 1
        store.mark_acked(gone.event_key, "id-gone", NOW)
        # deleted on the API by a repair: dropped, and without a body it can never be resent
        assert store.mark_deleted([gone.event_key], "deleted by reconcile --repair", NOW) == 1
        store.adopt([], NOW, checked_at=NOW)
        assert store.prune(NOW + timedelta(days=29), 3600, 3600) == (0, 0)
        assert store.retry([gone.event_key], NOW) == 0
        assert store.retry([dead.event_key], NOW) == 1
        assert store.to_send()[0].body == request_body(dead)
        store.mark_dead(dead.event_key, "HTTP 400", NOW)
        store.drop([dead.event_key], NOW)
        assert store.prune(NOW + timedelta(days=31), 3600, 3600) == (0, 2)
        assert store.counts()["dropped"] == 0


def test_status_totals_are_kept_by_the_hour_for_thirty_days(tmp_path: Path) -> None:
    old, new = events_for("1")[0], events_for("2", 1800)[0]
    with State.open(tmp_path / "s.db") as store:
        store_events(store, [old, new], NOW)
        store.record_outcomes([acked(old.event_key)], NOW - timedelta(days=20))
        store.record_outcomes([acked(new.event_key)], NOW - timedelta(minutes=90))
        store.adopt([], NOW, checked_at=NOW)
        store.prune(NOW, 3600, 3600)
        assert store.counts()["acked"] == 0
        assert store.totals_since(NOW - timedelta(days=1)) == [(*PAIR, new.quantity, 1)]
        # to the hour: the hour holding the start counts whole
        assert store.totals_since(NOW - timedelta(minutes=61)) == [(*PAIR, new.quantity, 1)]
        assert store.totals_since(NOW - timedelta(minutes=59)) == []
        both = [(*PAIR, old.quantity + new.quantity, 2)]
        assert store.totals_since(NOW - timedelta(days=30)) == both
        store.prune(NOW + timedelta(days=12), 3600, 3600)  # the old hour is 32 days old
        assert store.totals_since(NOW - timedelta(days=30)) == [(*PAIR, new.quantity, 1)]
        assert store.posted_totals() == {PAIR: (2, old.quantity + new.quantity)}


# ------------------------------------------------------------------------ progress, space


def test_without_a_mark_progress_is_forgotten_behind_the_newest_billed_end(
    tmp_path: Path,
) -> None:
    """Saved sacct files have no window (no high-water mark): the newest billed end of a final
    run stands in for the mark, with SAVED_FILE_SLACK_S (a week) more to spare than a window
    needs, so a state fed by files alone stays bounded too. Mutant: no pruning without a mark
    (the state grows with every run ever read)."""
    early = events_for("1")  # ended T0 + 1 h
    edge = events_for("2", start_at=T0 + timedelta(days=22))  # ends T0 + 22 d + 1 h
    late = events_for("3", start_at=T0 + timedelta(days=30))  # ends T0 + 30 d + 1 h
    horizon = T0 + timedelta(days=30, hours=1) - timedelta(hours=1, days=1, weeks=1)
    assert state.SAVED_FILE_SLACK_S == 7 * 86400
    with State.open(tmp_path / "s.db") as store:
        store_events(store, early + edge + late)
        store.record_outcomes([acked(e.event_key) for e in early + edge + late], NOW)
        later = NOW + timedelta(days=40)
        store.adopt([], later, checked_at=later)
        assert store.prune(later, 3600, 3600) == (1, 3)
        assert store.pruned_before() == horizon and store.high_water_at() is None
        # edge ended an hour after the horizon: kept, as the late run is
        assert store.reported([e.run for e in early + edge + late]) == {
            edge[0].run: 3600,
            late[0].run: 3600,
        }


def test_without_a_mark_the_horizon_never_passes_the_clock(tmp_path: Path) -> None:
    """A billed end after ``now`` (a clock set back) does not move the horizon past now - 8 d
    - overlap. Mutant: the newest end taken as it is forgets the run that ended 9 days ago
    relative to that future end but only 2 days before now."""
    recent = events_for("1", start_at=NOW - timedelta(days=2))
    future = events_for("2", start_at=NOW + timedelta(days=7))
    with State.open(tmp_path / "s.db") as store:
        store_events(store, recent + future)
        assert store.prune(NOW, 3600, 3600) == (0, 0)
        assert store.pruned_before() is None
        assert set(store.reported([recent[0].run, future[0].run])) == {
            recent[0].run,
            future[0].run,
        }


def test_a_prune_gives_the_freed_space_back(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    events = [e for job in range(1, 1500) for e in events_for(str(job))]
    with State.open(path) as store:
        store_events(store, events, NOW)
        store.record_outcomes([acked(e.event_key) for e in events], NOW - timedelta(hours=2))
        store.adopt([], NOW, checked_at=NOW)
        full = store.size()["file"]
        assert store.prune(NOW, 3600, 3600) == (0, len(events))
        size = store.size()
        assert size["file"] < full / 2 and size["free"] * 4 <= size["file"]
    assert path.stat().st_size < full / 2  # the file itself, once checkpointed
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # a new file: incremental
    conn.close()


def test_a_small_prune_keeps_its_free_pages_for_the_next_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    keep = [e for job in range(1, 400) for e in events_for(str(job))]
    drop = [e for job in range(400, 420) for e in events_for(str(job))]
    with State.open(path) as store:
        store_events(store, keep + drop, NOW)
        store.record_outcomes([acked(e.event_key) for e in drop], NOW - timedelta(hours=2))
        store.adopt([], NOW, checked_at=NOW)
        full = store.size()["file"]
        assert store.prune(NOW, 3600, 3600) == (0, len(drop))
        assert store.size()["file"] == full  # no churn: a few free pages are reused
