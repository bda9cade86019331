"""The base of :class:`state.State`: one connection, one lock, and the discipline every
method follows (one IMMEDIATE transaction per write, sqlite3 errors translated). Each concern of
the state is a mixin of this class (state_outbox, state_plan, state_marks, ...)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from slurm_tracker.errors import StateError, StateUnavailable
from slurm_tracker.state_rows import from_epoch
from slurm_tracker.state_safety import is_bug, translate
from slurm_tracker.state_schema import SCHEMA_VERSION


class StateBase:
    """An open state file's connection. Methods are safe to call from several threads.

    Every method raises StateUnavailable (temporary) or StateError (damaged) instead of a
    sqlite3 error; only errors of our own making (a bad SQL statement) pass through.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._schema = SCHEMA_VERSION  # the file's version (older when opened read-only)
        self.path = path
        self.readonly = readonly

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Translate sqlite3 errors into StateUnavailable / StateError."""
        try:
            yield
        except sqlite3.Error as exc:
            if is_bug(exc):
                raise
            raise translate(exc, self.path, doing) from exc

    @contextmanager
    def _tx(self, doing: str = "write to it") -> Iterator[sqlite3.Cursor]:
        """One IMMEDIATE transaction: all of it is committed, or none of it."""
        with self._guard(doing), self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")  # a failed COMMIT (disk full) leaves it open: rolled back
            except BaseException:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._guard("read it"), self._lock:
            return self._conn.execute(sql, params).fetchall()

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds wrong, one line each (empty when sound).

        Damage is reported, not raised (when the check itself stops on it, its error is the
        last line); StateUnavailable when the file cannot be read right now.
        """
        lines: list[str] = []
        with self._lock:
            try:
                for (row,) in self._conn.execute("PRAGMA integrity_check"):
                    lines.extend(str(row).splitlines())
            except sqlite3.Error as exc:
                failure = translate(exc, self.path, "check it")
                if isinstance(failure, StateUnavailable):
                    raise failure from exc
                lines.append(str(exc))
        problems = [line for line in lines if line and not line.startswith("*** in database")]
        return [] if problems == ["ok"] else problems

    # ------------------------------------------------------------------ meta
    def _meta(self, key: str) -> Optional[str]:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def _meta_time(self, key: str) -> Optional[datetime]:
        """A time stored in meta (epoch seconds), or None when it is not stored."""
        value = self._meta(key)
        return from_epoch(int(value)) if value else None

    def _writable(self) -> None:
        if self.readonly:
            raise StateError(f"state file {self.path} was opened read-only (dry run)")
