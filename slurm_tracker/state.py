"""The state file (SQLite): high-water mark, per-run progress and the outbox.

The only module that writes it. Planning stores the new outbox rows, the runs' progress and
the high-water mark in ONE transaction before anything is sent, so a crash at any instant
leaves either nothing or everything of a plan, and every stored event is sent later.

Outbox statuses: ``pending`` (to send), ``sending`` (an attempt may be in flight: its outcome
is unknown until the event key is looked up), ``acked`` (the API has it), ``dead`` (the API
refused it permanently; an admin retries or drops it), ``dropped`` (an admin gave it up).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from slurm_tracker.errors import LockHeld, StateError
from slurm_tracker.models import PlannedEvent, RunKey

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("pending", "sending", "acked", "dead", "dropped")

_MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
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
    ),
}


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def _time(value: Optional[int]) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


@dataclass(frozen=True)
class OutboxRow:
    event_key: str
    allocation: str
    sku: str
    quantity: Decimal
    started_at: datetime
    ended_at: datetime
    body: Mapping[str, Any]
    status: str
    attempts: int
    outcome_unknown: bool
    last_error: str
    event_id: Optional[str]
    created_at: datetime
    updated_at: datetime

    @property
    def needs_lookup(self) -> bool:
        """Whether an earlier attempt may have reached the API (look the key up first)."""
        return self.outcome_unknown or self.status == "sending"


@dataclass(frozen=True)
class Progress:
    reported_s: int
    last_end_at: datetime
    final: bool


class StateLock:
    """An exclusive, non-blocking lock beside the state file, naming its holder."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: Optional[int] = None

    def acquire(self, now_at: datetime) -> None:
        _private_parent(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeld(
                    f"state file {self.path.name[:-5]} is in use by another slurm-tracker "
                    f"({holder}); this run is skipped"
                ) from exc
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {now_at:%Y-%m-%dT%H:%M:%SZ}"
        os.write(fd, holder.encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _private_parent(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)


class State:
    """An open state file. Methods are safe to call from several threads."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.readonly = readonly

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> State:
        """Open (creating it 0600 unless ``readonly``) and migrate; StateError when unusable.

        A read-only open of a missing file gives an empty, in-memory state: a dry run before
        the first sync shows everything as new.
        """
        try:
            if readonly:
                if not path.exists():
                    conn = sqlite3.connect(":memory:", check_same_thread=False)
                    state = cls(conn, path, readonly=True)
                    state._migrate()
                    return state
                # Without a -wal file the database is fully checkpointed: read it as immutable,
                # so that not even the -shm/-wal side files are created. With one (a sync is
                # running, or died), read through the WAL to see its latest commits.
                wal = path.with_name(path.name + "-wal").exists()
                mode = "ro" if wal else "ro&immutable=1"
                conn = sqlite3.connect(
                    f"file:{quote(str(path))}?mode={mode}",
                    uri=True,
                    check_same_thread=False,
                    timeout=10,
                )
            else:
                _private_parent(path)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                os.chmod(path, 0o600)
                conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.isolation_level = None  # explicit transactions only
            state = cls(conn, path, readonly)
            state._check_version()
            if not readonly:
                state._migrate()
            return state
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"state file {path} cannot be used: {exc}. If it is corrupt, move it aside and "
                f"restore the latest backup; starting from an empty file would bill the "
                f"overlap window again unless sacct.first_sync_start is set to the last sync"
            ) from exc
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _version(self) -> int:
        row = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if row is None:
            return 0
        got = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(got[0]) if got else 0

    def _check_version(self) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} has schema version {version}, newer than this "
                f"slurm-tracker understands ({SCHEMA_VERSION}): upgrade slurm-tracker"
            )

    def _migrate(self) -> None:
        version = self._version()
        if version >= SCHEMA_VERSION:
            return
        with self._tx() as cur:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for sql in _MIGRATIONS[step]:
                    cur.execute(sql)
                if not self.readonly:
                    log.info("state file %s migrated to schema version %d", self.path, step)
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One IMMEDIATE transaction: all of it is committed, or none of it."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ meta
    def _meta(self, key: str) -> Optional[str]:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def high_water_at(self) -> Optional[datetime]:
        value = self._meta("high_water_at")
        return _time(int(value)) if value else None

    def pruned_before(self) -> Optional[datetime]:
        """Runs that ended before this instant may have lost their progress rows."""
        value = self._meta("pruned_before")
        return _time(int(value)) if value else None

    # ------------------------------------------------------------------ progress
    def reported(self, runs: Iterable[RunKey]) -> dict[RunKey, int]:
        """Elapsed seconds already billed, for those of ``runs`` that have been billed."""
        wanted = {run.text: run for run in runs}
        texts = list(wanted)
        result: dict[RunKey, int] = {}
        for i in range(0, len(texts), 500):
            chunk = texts[i : i + 500]
            marks = ",".join("?" for _ in chunk)
            for text, seconds in self._query(
                f"SELECT run, reported_s FROM progress WHERE run IN ({marks})", chunk
            ):
                result[wanted[text]] = seconds
        return result

    def progress(self, run: RunKey) -> Optional[Progress]:
        rows = self._query(
            "SELECT reported_s, last_end_at, final FROM progress WHERE run=?", (run.text,)
        )
        if not rows:
            return None
        seconds, end, final = rows[0]
        end_at = _time(end)
        assert end_at is not None
        return Progress(seconds, end_at, bool(final))

    # ------------------------------------------------------------------ planning
    def commit_plan(
        self,
        events: Sequence[PlannedEvent],
        bodies: Sequence[Mapping[str, Any]],
        now_at: datetime,
        high_water_at: Optional[datetime] = None,
    ) -> int:
        """Store new outbox rows, the runs' progress and the high-water mark in ONE transaction.

        Returns how many events were new (an event key already stored is left as it is).
        """
        self._writable()
        now = _epoch(now_at)
        progress: dict[str, tuple[int, int, bool]] = {}
        for event in events:
            seen = progress.get(event.run.text, (0, 0, False))
            progress[event.run.text] = (
                max(seen[0], event.to_s),
                max(seen[1], _epoch(event.ended_at)),
                seen[2] or event.final,
            )
        added = 0
        with self._tx() as cur:
            for event, body in zip(events, bodies):
                cur.execute(
                    """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity,
                       started_at, ended_at, body, status, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
                    (
                        event.event_key,
                        event.allocation,
                        event.sku,
                        str(event.quantity),
                        _epoch(event.started_at),
                        _epoch(event.ended_at),
                        json.dumps(body, sort_keys=True),
                        now,
                        now,
                    ),
                )
                added += cur.rowcount
            for run, (seconds, end, final) in progress.items():
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (run) DO UPDATE SET
                         reported_s = max(reported_s, excluded.reported_s),
                         last_end_at = max(last_end_at, excluded.last_end_at),
                         final = max(final, excluded.final),
                         updated_at = excluded.updated_at""",
                    (run, seconds, end, int(final), now),
                )
            if high_water_at is not None:
                cur.execute(
                    """INSERT INTO meta (key, value) VALUES ('high_water_at', ?)
                       ON CONFLICT (key) DO UPDATE SET value =
                         CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
                              AS TEXT)""",
                    (str(_epoch(high_water_at)),),
                )
        return added

    def _writable(self) -> None:
        if self.readonly:
            raise StateError(f"state file {self.path} was opened read-only (dry run)")

    # ------------------------------------------------------------------ outbox
    def outbox(
        self, statuses: Sequence[str] = STATUSES, limit: Optional[int] = None
    ) -> list[OutboxRow]:
        marks = ",".join("?" for _ in statuses)
        sql = f"SELECT * FROM outbox WHERE status IN ({marks}) ORDER BY created_at, event_key"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._row(r) for r in self._query(sql, tuple(statuses))]

    def to_send(self) -> list[OutboxRow]:
        """Events not yet acknowledged and not dead, oldest first."""
        return self.outbox(("pending", "sending"))

    @staticmethod
    def _row(r: Sequence[Any]) -> OutboxRow:
        started = _time(r[4])
        ended = _time(r[5])
        created = _time(r[12])
        updated = _time(r[13])
        assert started and ended and created and updated
        return OutboxRow(
            event_key=r[0],
            allocation=r[1],
            sku=r[2],
            quantity=Decimal(r[3]),
            started_at=started,
            ended_at=ended,
            body=json.loads(r[6]),
            status=r[7],
            attempts=r[8],
            outcome_unknown=bool(r[9]),
            last_error=r[10],
            event_id=r[11],
            created_at=created,
            updated_at=updated,
        )

    def _set(self, key: str, now_at: datetime, sql: str, params: Sequence[Any]) -> None:
        self._writable()
        with self._tx() as cur:
            cur.execute(
                f"UPDATE outbox SET {sql}, updated_at=? WHERE event_key=?",
                (*params, _epoch(now_at), key),
            )

    def mark_sending(self, key: str, now_at: datetime) -> None:
        """Recorded (and committed) before every attempt, so a crash mid-send is noticed."""
        self._set(key, now_at, "status='sending', attempts=attempts+1", ())

    def mark_acked(self, key: str, event_id: Optional[str], now_at: datetime) -> None:
        self._set(key, now_at, "status='acked', event_id=?, last_error=''", (event_id,))

    def mark_dead(self, key: str, error: str, now_at: datetime) -> None:
        self._set(key, now_at, "status='dead', last_error=?", (error,))

    def mark_pending(self, key: str, error: str, outcome_unknown: bool, now_at: datetime) -> None:
        """Not delivered this time; ``outcome_unknown`` is sticky until the key is acked."""
        self._set(
            key,
            now_at,
            "status='pending', last_error=?, outcome_unknown=max(outcome_unknown, ?)",
            (error, int(outcome_unknown)),
        )

    def retry(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Dead (or dropped) events back to pending; all dead ones when ``keys`` is None."""
        return self._move(keys, ("dead", "dropped"), "pending", now_at)

    def drop(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Give up dead events (kept, marked dropped, for the record)."""
        return self._move(keys, ("dead",), "dropped", now_at)

    def _move(
        self, keys: Optional[Sequence[str]], from_: Sequence[str], to: str, now_at: datetime
    ) -> int:
        self._writable()
        marks = ",".join("?" for _ in from_)
        sql = f"UPDATE outbox SET status=?, updated_at=? WHERE status IN ({marks})"
        with self._tx() as cur:
            if keys is None:
                cur.execute(sql, (to, _epoch(now_at), *from_))
                return cur.rowcount
            count = 0
            for key in keys:
                cur.execute(sql + " AND event_key=?", (to, _epoch(now_at), *from_, key))
                count += cur.rowcount
            return count

    # ------------------------------------------------------------------ housekeeping
    def prune(self, now_at: datetime, overlap_s: int, retention_s: int) -> tuple[int, int]:
        """Forget final runs that no future window can return, and old acknowledged events.

        A final run is kept while it could still appear in a window (ended after the high-water
        mark minus the overlap, with a day to spare). Returns (progress rows, outbox rows).
        """
        self._writable()
        high = self.high_water_at()
        removed_runs = 0
        with self._tx() as cur:
            if high is not None:
                horizon = _epoch(high - timedelta(seconds=overlap_s) - timedelta(days=1))
                cur.execute("DELETE FROM progress WHERE final=1 AND last_end_at < ?", (horizon,))
                removed_runs = cur.rowcount
                if removed_runs:
                    cur.execute(
                        """INSERT INTO meta (key, value) VALUES ('pruned_before', ?)
                           ON CONFLICT (key) DO UPDATE SET value = CAST(max(
                             CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)""",
                        (str(horizon),),
                    )
            cur.execute(
                "DELETE FROM outbox WHERE status IN ('acked', 'dropped') AND updated_at < ?",
                (_epoch(now_at) - retention_s,),
            )
            removed_events = cur.rowcount
        return removed_runs, removed_events

    def record_sync(
        self, started_at: datetime, finished_at: datetime, outcome: str, summary: Mapping[str, Any]
    ) -> None:
        self._writable()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO syncs (started_at, finished_at, outcome, summary) VALUES (?,?,?,?)",
                (_epoch(started_at), _epoch(finished_at), outcome, json.dumps(summary)),
            )
            cur.execute("DELETE FROM syncs WHERE id <= (SELECT max(id) FROM syncs) - 100")

    def last_sync(self) -> Optional[dict[str, Any]]:
        rows = self._query(
            "SELECT started_at, finished_at, outcome, summary FROM syncs ORDER BY id DESC LIMIT 1"
        )
        if not rows:
            return None
        started, finished, outcome, summary = rows[0]
        return {
            "startedAt": _time(started),
            "finishedAt": _time(finished),
            "outcome": outcome,
            "summary": json.loads(summary),
        }

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._query("SELECT status, count(*) FROM outbox GROUP BY status"):
            counts[status] = n
        return counts

    def totals_since(self, since_at: datetime) -> list[tuple[str, str, Decimal, int]]:
        """Acknowledged quantity per allocation and SKU for events acked since ``since_at``."""
        sums: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for allocation, sku, quantity in self._query(
            "SELECT allocation, sku, quantity FROM outbox WHERE status='acked' AND updated_at>=?",
            (_epoch(since_at),),
        ):
            q, n = sums.get((allocation, sku), (Decimal(0), 0))
            sums[(allocation, sku)] = (q + Decimal(quantity), n + 1)
        return [(a, s, q, n) for (a, s), (q, n) in sorted(sums.items())]
