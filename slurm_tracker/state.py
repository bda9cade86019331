"""The state file (SQLite): high-water mark, per-run progress, the outbox and the quarantine.

The only module that writes it. Planning stores the new outbox rows, the runs' progress, the
quarantined records and the high-water mark in ONE transaction before anything is sent, so a
crash at any instant leaves either nothing or everything of a plan, and every stored event is
sent later.

Outbox statuses: ``pending`` (to send), ``held`` (planned but implausibly large: sent only once
an operator releases it), ``sending`` (an attempt may be in flight: its outcome is unknown until
the event key is looked up), ``acked`` (the API has it), ``dead`` (the API refused it
permanently; an admin retries or drops it), ``dropped`` (an admin gave it up).

Kept small in steady state (schema version 4): an acknowledged row drops its request body (the
API has it; nothing sends it again) and keeps its key, allocation, SKU, quantity, times and the
API's id; acknowledged rows are deleted an hour after the last comparison with the API's record
(``ledger_checked_at``: the next comparison reads the keys of events created since then). What
outlives them is counted as they are acknowledged: cumulative totals per (allocation, SKU) for
the metrics (``totals``) and per hour for ``status`` (``acked_hours``, 31 days). The per-run
progress (a table WITHOUT ROWID: its key stored once) is what keeps billing exactly once; it is
pruned once no window can return a run (with saved files alone, which have no window: a week
behind the newest billed end). New files use ``auto_vacuum=INCREMENTAL``; a file made
by an older version is VACUUMed once when migrated (under the lock), and a prune that leaves
more than a quarter of the file free gives the free pages back.

The file is trusted with what was billed, so it is opened like ssh's StrictModes would (see
``files``): no links, a regular file of ours in a directory only we (or root) can change. Only
a MISSING file is created (atomically, complete with its schema); one that exists but is empty,
not SQLite, another application's or of an unknown schema is refused: starting afresh would
bill the whole window again. Faults of the environment never escape as sqlite3 or OS errors:
a full disk, a read-only file system, an I/O error or a busy database are ``StateUnavailable``
(temporary: nothing is lost, the next run continues), a damaged or foreign file ``StateError``.

The code lives in one module per concern, and ``State`` is composed of one mixin per concern
over :class:`state_base.StateBase` (the connection, its lock and its transactions):
``state_schema`` (the version, the tables, the migrations), ``state_safety`` (errors
translated, side files checked, :class:`StateLock`), ``state_rows`` (the values it gives and
takes), ``state_plan`` (progress, ``commit_plan``, ``adopt``), ``state_outbox`` (statuses,
delivery outcomes, retry/drop/release/replan), ``state_marks`` (the marks, pruning),
``state_quarantine``, ``state_corrections``, ``state_queries`` (syncs, counts, totals),
``state_totals`` (what is counted as it goes) and ``state_migration`` (the Go agent's progress).
This module opens, creates, checks and migrates the file, and is the entry point: the names
other modules use are re-exported here on purpose (``__all__``); import them from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from slurm_tracker import files
from slurm_tracker.errors import StateError, UnsafeFile
from slurm_tracker.state_corrections import CorrectionsMixin
from slurm_tracker.state_marks import MarksMixin
from slurm_tracker.state_migration import MigrationMixin
from slurm_tracker.state_outbox import OutboxMixin
from slurm_tracker.state_plan import PlanMixin
from slurm_tracker.state_quarantine import QuarantineMixin
from slurm_tracker.state_queries import QueriesMixin
from slurm_tracker.state_rows import (
    AdoptedEvent,
    CorrectionRow,
    CorrectionSeen,
    OutboxRow,
    OutboxUpdate,
    Progress,
    QuarantineEntry,
    QuarantineRow,
    StatusSnapshot,
)
from slurm_tracker.state_safety import (
    FRESH_START_HINT,
    StateLock,
    check_side_file,
    is_bug,
    os_failure,
    refuse_empty,
    translate,
)
from slurm_tracker.state_schema import (
    APPLICATION_ID,
    CORRECTION_STATUSES,
    HOURS_KEPT,
    JOURNAL_SIZE_LIMIT,
    MIGRATIONS,
    QUARANTINE_TEXT_MAX,
    RECORD_RETENTION_S,
    SAVED_FILE_SLACK_S,
    SCHEMA_VERSION,
    SIDE_SUFFIXES,
    STATUSES,
    TABLES,
    VACUUM_FREE_SHARE,
)
from slurm_tracker.state_totals import carry_counts as _carry_counts  # patched by a test
from slurm_tracker.statuses import OutboxStatus, SyncOutcome

__all__ = [
    "APPLICATION_ID",
    "CORRECTION_STATUSES",
    "HOURS_KEPT",
    "JOURNAL_SIZE_LIMIT",
    "QUARANTINE_TEXT_MAX",
    "RECORD_RETENTION_S",
    "SAVED_FILE_SLACK_S",
    "SCHEMA_VERSION",
    "STATUSES",
    "VACUUM_FREE_SHARE",
    "AdoptedEvent",
    "CorrectionRow",
    "CorrectionSeen",
    "OutboxRow",
    "OutboxStatus",
    "OutboxUpdate",
    "Progress",
    "QuarantineEntry",
    "QuarantineRow",
    "State",
    "StateLock",
    "StatusSnapshot",
    "SyncOutcome",
]

log = logging.getLogger(__name__)


class State(
    PlanMixin,
    OutboxMixin,
    MarksMixin,
    QuarantineMixin,
    CorrectionsMixin,
    QueriesMixin,
    MigrationMixin,
):
    """An open state file. Methods are safe to call from several threads.

    Every method raises StateUnavailable (temporary) or StateError (damaged) instead of a
    sqlite3 error; only errors of our own making (a bad SQL statement) pass through.
    """

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> State:
        """Open (creating it, complete and 0600, if missing unless ``readonly``) and migrate.

        A read-only open of a missing file gives an empty, in-memory state: a dry run before
        the first sync shows everything as new. Raises UnsafeFile (a link, another user's
        file or directory), StateError (empty, foreign, newer, damaged, not permitted) or
        StateUnavailable (full disk, read-only file system, I/O error).
        """
        try:
            return cls._open_readonly(path) if readonly else cls._open_writable(path)
        except sqlite3.Error as exc:
            raise translate(exc, path, "open it") from exc
        except OSError as exc:
            raise os_failure(exc, path, "open it") from exc

    @classmethod
    def _open_readonly(cls, path: Path) -> State:
        try:
            os.lstat(path)
        except FileNotFoundError:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            conn.isolation_level = None
            state = cls(conn, path, readonly=True)
            state._migrate()
            return state
        fd = files.open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, "state file")
        try:
            info = files.check_open_file(fd, path, "state file", owned_by_us=False, any_owner=True)
            refuse_empty(info, path)
            for suffix in SIDE_SUFFIXES:
                check_side_file(path.with_name(path.name + suffix), writer=False)
            # Without a -wal file the database is fully checkpointed: read it as immutable, so
            # that not even the -shm/-wal side files are created. With one (a sync is running,
            # or died), read through the WAL to see its latest commits.
            wal = os.path.lexists(path.with_name(path.name + "-wal"))
            mode = "ro" if wal else "ro&immutable=1"
            conn = sqlite3.connect(
                f"file:{quote(str(path))}?mode={mode}",
                uri=True,
                check_same_thread=False,
                timeout=10,
            )
        finally:
            os.close(fd)
        try:
            conn.isolation_level = None
            state = cls(conn, path, readonly=True)
            state._check_ours()
        except BaseException:
            conn.close()
            raise
        return state

    @classmethod
    def _open_writable(cls, path: Path) -> State:
        files.ensure_private_dir(path.parent, f"state file {path}")
        if not os.path.lexists(path):
            cls._create(path)
        fd = files.open_nofollow(path, os.O_RDWR | os.O_NONBLOCK, "state file")
        try:
            info = files.check_open_file(fd, path, "state file", owned_by_us=True)
            refuse_empty(info, path)
            for suffix in SIDE_SUFFIXES:
                check_side_file(path.with_name(path.name + suffix), writer=True)
            # mode=rw: SQLite never creates the file (only _create does, complete)
            conn = sqlite3.connect(
                f"file:{quote(str(path))}?mode=rw", uri=True, check_same_thread=False, timeout=30
            )
            try:
                conn.isolation_level = None
                state = cls(conn, path, readonly=False)
                state._check_ours()
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                    raise UnsafeFile(f"state file {path} was replaced while being opened")
                if stat.S_IMODE(info.st_mode) & 0o077:  # ours, but others may read it
                    os.fchmod(fd, 0o600)  # through the descriptor: never a link's target
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
                state._migrate()
            except BaseException:
                conn.close()
                raise
        finally:
            os.close(fd)
        return state

    @classmethod
    def _create(cls, path: Path) -> None:
        """Create the state file complete with its schema, or not at all.

        Built in a fresh temporary file (0600) of the same directory, then hard-linked to its
        name, which fails if the name exists (made meanwhile: then it is opened as it is). A
        crash or a full disk never leaves an empty or half-made state file behind.
        """
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        os.close(fd)
        try:
            conn = sqlite3.connect(tmp_name, check_same_thread=False)
            try:
                conn.isolation_level = None
                conn.execute("PRAGMA synchronous=FULL")  # the commit reaches the disk
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before any table exists
                cls(conn, path, readonly=False)._migrate()
            finally:
                conn.close()
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                return
            files.fsync_directory(path.parent)
            log.info("state file %s created (schema version %d)", path, SCHEMA_VERSION)
        finally:
            for leftover in (tmp_name, tmp_name + "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)

    def _check_ours(self) -> None:
        """Refuse a file that is not a slurm-tracker state of a schema we know (reads only)."""
        conn = self._conn
        (app,) = conn.execute("PRAGMA application_id").fetchone()
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = self._read_version(tables)
        problem = ""
        if app not in (0, APPLICATION_ID):
            problem = f"its header names another application (application id {app:#x})"
        elif version == 0:
            problem = "it has no slurm-tracker schema version"
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"state file {self.path} has schema version {version}, newer than this "
                f"slurm-tracker understands ({SCHEMA_VERSION}): upgrade slurm-tracker"
            )
        elif not TABLES[version] <= tables:
            missing = ", ".join(sorted(TABLES[version] - tables))
            problem = f"tables of schema version {version} are missing ({missing})"
        if problem:
            raise StateError(
                f"state file {self.path} is not a slurm-tracker state file: {problem}. "
                f"{FRESH_START_HINT}"
            )
        self._schema = version

    def _read_version(self, tables: Collection[str]) -> int:
        if "meta" not in tables:
            return 0
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(meta)")}
        if not {"key", "value"} <= columns:
            return 0
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        try:
            version = int(row[0]) if row else 0
        except (TypeError, ValueError):
            return 0
        return max(version, 0)

    def close(self) -> None:
        with self._guard("close it"):
            self._conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        """Bring a file of ours (or a new one) to SCHEMA_VERSION, in one transaction.

        A file of an older version is then VACUUMed once, outside that transaction (the caller
        holds the lock), so that it takes ``auto_vacuum=INCREMENTAL`` (it only takes effect on
        a new file or through a VACUUM) and gives back what the migration freed. A VACUUM that
        fails (it needs free space about the size of the file) is only a warning: the file is
        migrated and works; it just does not shrink until a VACUUM succeeds (see README).
        """
        with self._tx("migrate it") as cur:
            tables = {
                n for (n,) in cur.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = self._read_version(tables)
            (app,) = cur.execute("PRAGMA application_id").fetchone()
            if version >= SCHEMA_VERSION and app == APPLICATION_ID:
                return
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for sql in MIGRATIONS[step]:
                    cur.execute(sql)
                if step == 4:
                    _carry_counts(cur, int(time.time()))
            cur.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        if 0 < version < SCHEMA_VERSION:
            log.info("state file %s migrated to schema version %d", self.path, SCHEMA_VERSION)
        self._schema = SCHEMA_VERSION
        if 0 < version < 4 and not self.readonly:
            self._vacuum_once()

    def _vacuum_once(self) -> None:
        """VACUUM into ``auto_vacuum=INCREMENTAL`` (after a migration from version 3 or older)."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._conn.execute("VACUUM")
            except sqlite3.Error as exc:
                if is_bug(exc):
                    raise
                log.warning(
                    "state file %s: migrated, but it could not be compacted (VACUUM: %s); it "
                    "works as it is and keeps its size: run `sqlite3 %s 'PRAGMA "
                    "auto_vacuum=INCREMENTAL; VACUUM'` once while no sync runs to shrink it",
                    self.path,
                    exc,
                    self.path,
                )

    # ------------------------------------------------------------------ status
    def status_snapshot(self, since: Sequence[datetime]) -> StatusSnapshot:
        """What ``slurm-tracker status`` shows of this file, with the acknowledged totals since
        each of ``since`` (see totals_since)."""
        return StatusSnapshot(
            high_water_at=self.high_water_at(),
            outbox=self.counts(),
            oldest_waiting_at=self.oldest_waiting_at(),
            quarantined=self.quarantine_count(),
            open_corrections=self.correction_count(),
            acked_since=tuple(self.totals_since(at) for at in since),
            last_sync=self.last_sync(),
        )
