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
pruned once no window can return a run. New files use ``auto_vacuum=INCREMENTAL``; a file made
by an older version is VACUUMed once when migrated (under the lock), and a prune that leaves
more than a quarter of the file free gives the free pages back.

The file is trusted with what was billed, so it is opened like ssh's StrictModes would (see
``files``): no links, a regular file of ours in a directory only we (or root) can change. Only
a MISSING file is created (atomically, complete with its schema); one that exists but is empty,
not SQLite, another application's or of an unknown schema is refused: starting afresh would
bill the whole window again. Faults of the environment never escape as sqlite3 or OS errors:
a full disk, a read-only file system, an I/O error or a busy database are ``StateUnavailable``
(temporary: nothing is lost, the next run continues), a damaged or foreign file ``StateError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import quote

from slurm_tracker import files
from slurm_tracker.errors import LockHeld, StateError, StateUnavailable, TrackerError, UnsafeFile
from slurm_tracker.models import PlannedEvent, RunKey

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
APPLICATION_ID = 0x534C5452  # "SLTR" in the SQLite header: this file is a slurm-tracker state
STATUSES = ("pending", "held", "sending", "acked", "dead", "dropped")
QUARANTINE_TEXT_MAX = 1000  # characters kept of a quarantined record's text and reason

_PROGRESS_COLUMNS = "run, reported_s, last_end_at, final, updated_at"
_OUTBOX_COLUMNS = (
    "event_key, allocation, sku, quantity, started_at, ended_at, body, status, attempts, "
    "outcome_unknown, last_error, event_id, created_at, updated_at"
)
_QUARANTINE_COLUMNS = (
    "key, job_id, reason, text, first_seen_at, last_seen_at, times_seen, resolved_at"
)
_CORRECTION_COLUMNS = (
    "run, job_id, allocations, skus, billed_s, actual_s, record, status, removed, attempts, "
    "note, first_seen_at, last_seen_at, times_seen, updated_at, resolved_at"
)
CORRECTION_STATUSES = ("open", "applied", "dismissed")
RECORD_RETENTION_S = 30 * 86400  # dropped events and resolved quarantine entries: kept this long
HOURS_KEPT = 31 * 24  # hours of acknowledged totals kept for `status` (its last 30 days)
VACUUM_FREE_SHARE = 4  # a prune leaving more than 1/4 of the pages free gives them back
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # the -wal file is truncated to this after a checkpoint


#: An acknowledgement: the row is written again without its request body (the API has it),
#: at the end of the table (a new rowid; REPLACE deletes the old row), so that acknowledged
#: rows lie packed together and the pages of the bodies they had empty out whole and are reused
#: (a row shrunk in place would leave its page two thirds empty until it is pruned).
_ACK = f"""INSERT OR REPLACE INTO outbox ({_OUTBOX_COLUMNS})
    SELECT event_key, allocation, sku, quantity, started_at, ended_at, '', 'acked',
           max(0, attempts + ?), max(outcome_unknown, ?), '', coalesce(?, event_id),
           created_at, ?
    FROM outbox WHERE event_key=?"""


def _outbox_ddl(table: str, statuses: Sequence[str]) -> str:
    allowed = ", ".join(f"'{s}'" for s in statuses)
    return f"""CREATE TABLE {table} (
            event_key TEXT PRIMARY KEY,
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            started_at INTEGER NOT NULL,
            ended_at INTEGER NOT NULL,
            body TEXT NOT NULL,            -- the JSON request body
            status TEXT NOT NULL CHECK (status IN
                ({allowed})),
            attempts INTEGER NOT NULL DEFAULT 0,
            outcome_unknown INTEGER NOT NULL DEFAULT 0,  -- an earlier attempt may have landed
            last_error TEXT NOT NULL DEFAULT '',
            event_id TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )"""


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
        _outbox_ddl("outbox", ("pending", "sending", "acked", "dead", "dropped")),
        "CREATE INDEX outbox_status ON outbox (status, created_at)",
        """CREATE TABLE syncs (
            id INTEGER PRIMARY KEY,
            started_at INTEGER NOT NULL,
            finished_at INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            summary TEXT NOT NULL          -- JSON counts
        )""",
    ),
    2: (
        # SQLite cannot alter a CHECK constraint: rebuild the outbox (in the same transaction)
        _outbox_ddl("outbox_v2", STATUSES),
        f"INSERT INTO outbox_v2 ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM outbox",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_v2 RENAME TO outbox",
        "CREATE INDEX outbox_status ON outbox (status, created_at)",
        """CREATE TABLE quarantine (
            key TEXT PRIMARY KEY,          -- a run's identity text, or a hash of a record's text
            job_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            text TEXT NOT NULL,            -- a snippet of the record
            first_seen_at INTEGER NOT NULL,
            last_seen_at INTEGER NOT NULL,
            times_seen INTEGER NOT NULL DEFAULT 1,
            resolved_at INTEGER            -- NULL while open
        )""",
        "CREATE INDEX quarantine_open ON quarantine (resolved_at, first_seen_at)",
    ),
    3: (
        """CREATE TABLE corrections (
            run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
            job_id TEXT NOT NULL,
            allocations TEXT NOT NULL,     -- JSON list: where the mapping bills the run
            skus TEXT NOT NULL,            -- JSON list of SKU codes
            billed_s INTEGER NOT NULL,     -- elapsed seconds billed (the run's progress)
            actual_s INTEGER NOT NULL,     -- slurmdbd's ElapsedRaw, as last seen
            record TEXT NOT NULL,          -- JSON: the record as last seen (corrections.py)
            status TEXT NOT NULL CHECK (status IN ('open', 'applied', 'dismissed')),
            removed TEXT NOT NULL DEFAULT '[]',  -- JSON: stretches deleted on the API so far
            attempts INTEGER NOT NULL DEFAULT 0,
            note TEXT NOT NULL DEFAULT '', -- why it is still open, or why it was dismissed
            first_seen_at INTEGER NOT NULL,
            last_seen_at INTEGER NOT NULL,
            times_seen INTEGER NOT NULL DEFAULT 1,
            updated_at INTEGER NOT NULL,
            resolved_at INTEGER            -- NULL while open
        )""",
        "CREATE INDEX corrections_status ON corrections (status, first_seen_at)",
    ),
    4: (
        # progress WITHOUT ROWID: the run's text is stored once (not again in an index)
        """CREATE TABLE progress_v4 (
            run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
            reported_s INTEGER NOT NULL,   -- elapsed seconds billed so far
            last_end_at INTEGER NOT NULL,  -- wall-clock end of the last billed segment (epoch)
            final INTEGER NOT NULL,        -- the run has ended and is fully billed
            updated_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        f"INSERT INTO progress_v4 ({_PROGRESS_COLUMNS}) SELECT {_PROGRESS_COLUMNS} FROM progress",
        "DROP TABLE progress",
        "ALTER TABLE progress_v4 RENAME TO progress",
        "CREATE INDEX progress_pruning ON progress (last_end_at) WHERE final=1",
        "CREATE INDEX outbox_settled ON outbox (status, updated_at)",
        """CREATE TABLE totals (           -- cumulative, never lowered (the metrics' counters)
            kind TEXT NOT NULL CHECK (kind IN ('planned', 'posted', 'looked_up', 'dead')),
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            events INTEGER NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            PRIMARY KEY (kind, allocation, sku)
        ) WITHOUT ROWID""",
        """CREATE TABLE acked_hours (      -- acknowledged per hour (`status`), HOURS_KEPT of them
            hour INTEGER NOT NULL,         -- epoch seconds // 3600 of the acknowledgement
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            events INTEGER NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            PRIMARY KEY (hour, allocation, sku)
        ) WITHOUT ROWID""",
    ),
}
_TABLES: Mapping[int, frozenset[str]] = {
    1: frozenset({"meta", "progress", "outbox", "syncs"}),
    2: frozenset({"meta", "progress", "outbox", "syncs", "quarantine"}),
    3: frozenset({"meta", "progress", "outbox", "syncs", "quarantine", "corrections"}),
    4: frozenset(
        {"meta", "progress", "outbox", "syncs", "quarantine", "corrections", "totals"}
        | {"acked_hours"}
    ),
}
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")

_FRESH_START_HINT = (
    "A fresh start would bill again everything in the window (the API cannot refuse a "
    "duplicate): restore the latest backup of the state file, or move this file aside only "
    "if you know nothing was billed from it"
)
_NOTHING_LOST = "nothing is lost: the next run continues where this one stopped"

# SQLite primary result codes (the low byte of an extended code)
_SQLITE_TEMPORARY = {
    5: "the database is busy (locked by another process)",  # SQLITE_BUSY
    6: "a table is locked",  # SQLITE_LOCKED
    8: "the database or its file system is read-only",  # SQLITE_READONLY
    10: "an I/O error occurred",  # SQLITE_IOERR
    13: "the disk is full",  # SQLITE_FULL
    14: "the file cannot be opened",  # SQLITE_CANTOPEN
    15: "the locking protocol failed",  # SQLITE_PROTOCOL
}
_SQLITE_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
# Python < 3.11 gives no code: the messages SQLite gives for those codes
_SQLITE_MESSAGES = (
    ("disk is full", 13),
    ("readonly", 8),
    ("read-only", 8),
    ("disk i/o error", 10),
    ("database is locked", 5),
    ("table is locked", 6),
    ("unable to open", 14),
    ("locking protocol", 15),
    ("malformed", 11),
    ("corrupt", 11),
    ("not a database", 26),
)
_OS_TEMPORARY = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EIO: "an I/O error occurred",
}


def _sqlite_code(exc: sqlite3.Error) -> Optional[int]:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    for needle, found in _SQLITE_MESSAGES:
        if needle in text:
            return found
    return None


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> TrackerError:
    """The domain error for a sqlite3 error met while ``doing`` something with the file."""
    code = _sqlite_code(exc)
    if code == 10 and _disk_full(path):
        code = 13  # SQLite says "disk I/O error" when it cannot grow the -shm file
    if code in _SQLITE_TEMPORARY:
        return StateUnavailable(
            f"state file {path}: cannot {doing}: {_SQLITE_TEMPORARY[code]} ({exc}); {_NOTHING_LOST}"
        )
    if code in _SQLITE_CORRUPT:
        return StateError(
            f"state file {path} cannot be used: it is damaged or is not a slurm-tracker state "
            f"file ({exc}; while trying to {doing}). `slurm-tracker check` lists the damage. "
            f"{_FRESH_START_HINT}"
        )
    return StateError(f"state file {path}: cannot {doing}: {exc}")


def _disk_full(path: Path) -> bool:
    """Whether the file system of ``path`` has no block left for this user."""
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _is_bug(exc: sqlite3.Error) -> bool:
    """Errors of our own making (bad SQL, a constraint, a closed connection): not translated."""
    bug = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
    code = _sqlite_code(exc)
    return isinstance(exc, bug) and code not in _SQLITE_TEMPORARY and code not in _SQLITE_CORRUPT


def _os_failure(exc: OSError, path: Path, doing: str, what: str = "state file") -> TrackerError:
    """The domain error for an OSError met while opening, creating or locking the file."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    reason = exc.strerror or str(exc)
    if exc.errno in _OS_TEMPORARY:
        return StateUnavailable(
            f"{what} {path}: cannot {doing}: {_OS_TEMPORARY[exc.errno]} ({reason}{where}); "
            f"{_NOTHING_LOST}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StateError(
            f"{what} {path}: cannot {doing}: permission denied ({reason}{where}). Run "
            "slurm-tracker as the user who owns it, and check that this user may write the "
            "file and its directory and that the file is not immutable (`lsattr`)"
        )
    return StateError(f"{what} {path}: cannot {doing}: {reason}{where}")


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def _time(value: Optional[int]) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


def _iso(value: datetime) -> str:
    return f"{value.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


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
class OutboxUpdate:
    """The outcome of one send, written by :meth:`State.record_outcomes`.

    ``status``: ``acked`` (with the API's ``event_id``), ``dead`` or ``pending``. ``error``
    None keeps the row's last error. ``outcome_unknown`` is sticky (never cleared here).
    ``extra`` is added to the row's attempts (POSTs made beyond the one its mark counted; -1
    for a row marked ``sending`` and never posted).
    """

    event_key: str
    status: Literal["acked", "dead", "pending"]
    event_id: Optional[str] = None
    error: Optional[str] = None
    outcome_unknown: bool = False
    extra: int = 0
    found_by_lookup: bool = False  # acked because the look-up found it on the API


@dataclass(frozen=True)
class Progress:
    reported_s: int
    last_end_at: datetime
    final: bool


@dataclass(frozen=True)
class QuarantineEntry:
    """A record that could not be billed this time, to keep (and count) until resolved.

    ``key``: the run's identity text, or a hash of the record's text when it has none.
    ``text``: a snippet of the record (cut to QUARANTINE_TEXT_MAX characters when stored).
    ``remember_run``: the run's identity text when the caller knows the run was never billed
    before (it was submitted after the pruning horizon, so any billing would have left a
    progress row): a progress row of 0 seconds is kept for it, not final, so it is never
    pruned, and a later sane record is billed in full even after the horizon has passed it.
    """

    key: str
    job_id: str
    reason: str
    text: str
    remember_run: str = ""


@dataclass(frozen=True)
class AdoptedEvent:
    """An event the API holds, posted under our key format (see State.adopt)."""

    key: str
    allocation: str
    sku: str
    quantity: Decimal
    run: str  # the run's identity text
    to_s: int  # the run's elapsed seconds billed once this event counts
    started_at: datetime
    ended_at: datetime
    event_id: str


@dataclass(frozen=True)
class QuarantineRow:
    key: str
    job_id: str
    reason: str
    text: str
    first_seen_at: datetime
    last_seen_at: datetime
    times_seen: int
    resolved_at: Optional[datetime]  # None while open


@dataclass(frozen=True)
class CorrectionSeen:
    """A final run whose ElapsedRaw (``actual_s``) is below the ``billed_s`` seconds billed,
    as a plan found it (corrections.Correction.stored). ``record``: corrections.record_json."""

    run: str
    job_id: str
    allocations: tuple[str, ...]
    skus: tuple[str, ...]
    billed_s: int
    actual_s: int
    record: str


@dataclass(frozen=True)
class CorrectionRow:
    """A correction as the state file holds it (status open, applied or dismissed)."""

    run: str
    job_id: str
    allocations: tuple[str, ...]
    skus: tuple[str, ...]
    billed_s: int
    actual_s: int
    record: str
    status: str
    removed: str  # JSON: stretches an apply deleted on the API (corrections.stretches_json)
    attempts: int
    note: str
    first_seen_at: datetime
    last_seen_at: datetime
    times_seen: int
    updated_at: datetime
    resolved_at: Optional[datetime]


def _check_side_file(side: Path, writer: bool) -> None:
    """Refuse a -wal/-shm/-journal file that is a link, not regular, or not ours (``writer``).

    Looked at with lstat before any open (a device or FIFO is never opened), then checked on
    its descriptor; a writer narrows one of ours that group or others can read.
    """
    what = "state side file"
    try:
        info = os.lstat(side)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFile(
            f"{what} {side} is a symbolic link: remove it (another user could point it elsewhere)"
        )
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"{what} {side} is not a regular file")
    fd = files.open_nofollow(side, os.O_RDONLY | os.O_NONBLOCK, what)
    try:
        checked = files.check_open_file(fd, side, what, owned_by_us=writer, any_owner=not writer)
        if writer and stat.S_IMODE(checked.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _refuse_empty(info: os.stat_result, path: Path) -> None:
    if info.st_size == 0:
        raise StateError(
            f"state file {path} exists but is empty (truncated or replaced?): only a missing "
            f"state file is created. {_FRESH_START_HINT}"
        )


class StateLock:
    """An exclusive, non-blocking lock beside the state file, naming its holder."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: Optional[int] = None

    def acquire(self, now_at: datetime) -> None:
        what = "lock file"
        try:
            files.ensure_private_dir(self.path.parent, f"{what} {self.path}")
            fd = files.open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, what)
        except OSError as exc:
            raise _os_failure(exc, self.path, "create or open it", what) from exc
        try:
            files.check_open_file(fd, self.path, what, owned_by_us=True)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown"
                raise LockHeld(
                    f"state file {self.path.name[:-5]} is in use by another slurm-tracker "
                    f"({holder}); this run is skipped"
                ) from exc
            os.ftruncate(fd, 0)
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {_iso(now_at)}"
            os.pwrite(fd, holder.encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise _os_failure(exc, self.path, "lock it", what) from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class State:
    """An open state file. Methods are safe to call from several threads.

    Every method raises StateUnavailable (temporary) or StateError (damaged) instead of a
    sqlite3 error; only errors of our own making (a bad SQL statement) pass through.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._schema = SCHEMA_VERSION  # the file's version (older when opened read-only)
        self.path = path
        self.readonly = readonly

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
            raise _translate(exc, path, "open it") from exc
        except OSError as exc:
            raise _os_failure(exc, path, "open it") from exc

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
            _refuse_empty(info, path)
            for suffix in _SIDE_SUFFIXES:
                _check_side_file(path.with_name(path.name + suffix), writer=False)
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
            _refuse_empty(info, path)
            for suffix in _SIDE_SUFFIXES:
                _check_side_file(path.with_name(path.name + suffix), writer=True)
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
        elif not _TABLES[version] <= tables:
            missing = ", ".join(sorted(_TABLES[version] - tables))
            problem = f"tables of schema version {version} are missing ({missing})"
        if problem:
            raise StateError(
                f"state file {self.path} is not a slurm-tracker state file: {problem}. "
                f"{_FRESH_START_HINT}"
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
                for sql in _MIGRATIONS[step]:
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
                if _is_bug(exc):
                    raise
                log.warning(
                    "state file %s: migrated, but it could not be compacted (VACUUM: %s); it "
                    "works as it is and keeps its size: run `sqlite3 %s 'PRAGMA "
                    "auto_vacuum=INCREMENTAL; VACUUM'` once while no sync runs to shrink it",
                    self.path,
                    exc,
                    self.path,
                )

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Translate sqlite3 errors into StateUnavailable / StateError."""
        try:
            yield
        except sqlite3.Error as exc:
            if _is_bug(exc):
                raise
            raise _translate(exc, self.path, doing) from exc

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
                failure = _translate(exc, self.path, "check it")
                if isinstance(failure, StateUnavailable):
                    raise failure from exc
                lines.append(str(exc))
        problems = [line for line in lines if line and not line.startswith("*** in database")]
        return [] if problems == ["ok"] else problems

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

    def set_high_water(
        self, at: datetime, now_at: datetime, *, overlap_s: int = 0
    ) -> Optional[datetime]:
        """Repair the high-water mark (it may move back); returns the mark it replaces.

        Refused (StateError) after ``now_at`` or the real clock, and when the next window
        (from ``at`` minus ``overlap_s``, the sacct overlap) would start before
        ``pruned_before()``: runs that ended then are forgotten and would be billed twice.
        """
        self._writable()
        clock = min(now_at, datetime.now(timezone.utc))
        if at > clock:
            raise StateError(
                f"cannot set the high-water mark to {_iso(at)}: it is after now ({_iso(clock)}); "
                "the mark may never be ahead of the clock"
            )
        with self._tx("set the high-water mark") as cur:
            got: dict[str, str] = dict(
                cur.execute(
                    "SELECT key, value FROM meta WHERE key IN ('high_water_at', 'pruned_before')"
                ).fetchall()
            )
            pruned = _time(int(got["pruned_before"])) if "pruned_before" in got else None
            if pruned is not None and at - timedelta(seconds=overlap_s) < pruned:
                raise StateError(
                    f"cannot set the high-water mark to {_iso(at)}: the state file no longer "
                    f"remembers runs that ended before {_iso(pruned)} (pruned), and a window "
                    f"starting before then would bill them a second time; choose "
                    f"{_iso(pruned + timedelta(seconds=overlap_s))} or later"
                )
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('high_water_at', ?)",
                (str(_epoch(at)),),
            )
        old = _time(int(got["high_water_at"])) if "high_water_at" in got else None
        log.warning(
            "high-water mark set by hand to %s (it was %s)",
            _iso(at),
            _iso(old) if old else "unset",
        )
        return old

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
        *,
        held: Collection[str] = (),
        quarantine: Sequence[QuarantineEntry] = (),
        resolved: Collection[str] = (),
        corrections: Sequence[CorrectionSeen] = (),
        final_seen: Optional[Mapping[str, int]] = None,
    ) -> int:
        """Store a plan in ONE transaction: new outbox rows, the runs' progress, quarantined
        records, corrections (see ``_note_corrections``) and the high-water mark.

        Events whose key is in ``held`` are stored ``held`` (sent once released). Each
        ``quarantine`` entry is recorded or seen again (re-opened if it was resolved); open
        entries whose key is in ``resolved`` are closed (an entry in both stays open). The mark
        never moves back, nor past the real clock. Returns how many events were new (an event
        key already stored is left as it is).
        """
        self._writable()
        if len(events) != len(bodies):
            raise ValueError(f"{len(events)} events but {len(bodies)} bodies")
        now = _epoch(now_at)
        held_keys = frozenset(held)
        progress: dict[str, tuple[int, int, bool]] = {}
        for event in events:
            seen = progress.get(event.run.text, (0, 0, False))
            progress[event.run.text] = (
                max(seen[0], event.to_s),
                max(seen[1], _epoch(event.ended_at)),
                seen[2] or event.final,
            )
        entries = {e.key: e for e in quarantine}  # one sighting per key and plan
        mark = None if high_water_at is None else _not_after_clock(high_water_at)
        added = 0
        planned: list[tuple[str, str, str]] = []
        with self._tx("store the plan") as cur:
            for event, body in zip(events, bodies):
                cur.execute(
                    """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity,
                       started_at, ended_at, body, status, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        event.event_key,
                        event.allocation,
                        event.sku,
                        str(event.quantity),
                        _epoch(event.started_at),
                        _epoch(event.ended_at),
                        json.dumps(body, sort_keys=True),
                        "held" if event.event_key in held_keys else "pending",
                        now,
                        now,
                    ),
                )
                if cur.rowcount:
                    added += 1
                    planned.append((event.allocation, event.sku, str(event.quantity)))
            _add(cur, "totals", ("kind", "planned"), _counted(planned))
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
            for key in resolved:
                cur.execute(
                    "UPDATE quarantine SET resolved_at=? WHERE key=? AND resolved_at IS NULL",
                    (now, key),
                )
            for entry in entries.values():
                if entry.remember_run:
                    cur.execute(
                        """INSERT OR IGNORE INTO progress
                           (run, reported_s, last_end_at, final, updated_at)
                           VALUES (?, 0, 0, 0, ?)""",
                        (entry.remember_run, now),
                    )
                cur.execute(
                    f"""INSERT INTO quarantine ({_QUARANTINE_COLUMNS})
                       VALUES (?, ?, ?, ?, ?, ?, 1, NULL)
                       ON CONFLICT (key) DO UPDATE SET
                         job_id = excluded.job_id,
                         reason = excluded.reason,
                         text = excluded.text,
                         last_seen_at = excluded.last_seen_at,
                         times_seen = times_seen + 1,
                         resolved_at = NULL""",
                    (
                        entry.key,
                        entry.job_id,
                        entry.reason[:QUARANTINE_TEXT_MAX],
                        entry.text[:QUARANTINE_TEXT_MAX],
                        now,
                        now,
                    ),
                )
            self._note_corrections(cur, corrections, final_seen or {}, now)
            if mark is not None:
                cur.execute(
                    """INSERT INTO meta (key, value) VALUES ('high_water_at', ?)
                       ON CONFLICT (key) DO UPDATE SET value =
                         CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
                              AS TEXT)""",
                    (str(_epoch(mark)),),
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
        sql = (
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE status IN ({marks}) "
            "ORDER BY created_at, event_key"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._row(r) for r in self._query(sql, tuple(statuses))]

    def to_send(self) -> list[OutboxRow]:
        """Events not yet acknowledged, not dead and not held, oldest first."""
        return self.outbox(("pending", "sending"))

    def to_send_from(self, position: int, limit: int) -> tuple[list[OutboxRow], int]:
        """Up to ``limit`` events to send (pending or sending) stored after ``position`` (0:
        from the first), in the order they were stored, and the position to go on from.

        A delivery pass walks the outbox with it one batch at a time, whatever the backlog's
        size: the walk reads the table once (by rowid), and rows whose status changes during
        the walk keep their place."""
        rows = self._query(
            f"SELECT rowid, {_OUTBOX_COLUMNS} FROM outbox "
            "WHERE rowid > ? AND status IN ('pending', 'sending') ORDER BY rowid LIMIT ?",
            (position, int(limit)),
        )
        if not rows:
            return [], position
        return [self._row(r[1:]) for r in rows], int(rows[-1][0])

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
            body=json.loads(r[6]) if r[6] else {},  # '' once acknowledged (compacted)
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
        with self._tx(f"record the outcome of event {key}") as cur:
            cur.execute(
                f"UPDATE outbox SET {sql}, updated_at=? WHERE event_key=?",
                (*params, _epoch(now_at), key),
            )

    def mark_sending(self, key: str, now_at: datetime) -> None:
        """Recorded (and committed) before every attempt, so a crash mid-send is noticed."""
        self._set(key, now_at, "status='sending', attempts=attempts+1", ())

    def mark_sending_many(self, keys: Sequence[str], now_at: datetime) -> None:
        """Mark a batch of events ``sending`` in ONE committed transaction, before any of them
        is posted (delivery.py): a crash from then on makes the next run look them up."""
        self._writable()
        if not keys:
            return
        now = _epoch(now_at)
        with self._tx(f"record that {len(keys)} events are being sent") as cur:
            cur.executemany(
                "UPDATE outbox SET status='sending', attempts=attempts+1, updated_at=? "
                "WHERE event_key=?",
                [(now, key) for key in keys],
            )

    def record_outcomes(self, updates: Sequence[OutboxUpdate], now_at: datetime) -> None:
        """Record the outcomes of several sends in ONE transaction (see OutboxUpdate)."""
        self._writable()
        if not updates:
            return
        now = _epoch(now_at)
        doing = (
            f"record the outcome of event {updates[0].event_key}"
            if len(updates) == 1
            else f"record the outcome of {len(updates)} events"
        )
        with self._tx(doing) as cur:
            _count_acked(cur, [u.event_key for u in updates if u.status == "acked"], now)
            _count(cur, "looked_up", [u.event_key for u in updates if u.found_by_lookup], "acked")
            _count(cur, "dead", [u.event_key for u in updates if u.status == "dead"], "dead")
            for u in updates:
                if u.status == "acked":
                    cur.execute(
                        _ACK, (u.extra, int(u.outcome_unknown), u.event_id, now, u.event_key)
                    )
                    continue
                cur.execute(
                    """UPDATE outbox SET status=?, event_id=coalesce(?, event_id),
                         last_error=coalesce(?, last_error),
                         outcome_unknown=max(outcome_unknown, ?),
                         attempts=max(0, attempts + ?), updated_at=?
                       WHERE event_key=?""",
                    (
                        u.status,
                        u.event_id,
                        u.error,
                        int(u.outcome_unknown),
                        u.extra,
                        now,
                        u.event_key,
                    ),
                )

    def mark_acked(self, key: str, event_id: Optional[str], now_at: datetime) -> None:
        """Acknowledged: counted (totals), and its request body dropped (not needed again)."""
        self.record_outcomes([OutboxUpdate(key, "acked", event_id=event_id)], now_at)

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
        """Named dead (or dropped) events back to pending; with ``keys`` None, every dead one
        (never the dropped ones: an operator gave those up on purpose)."""
        if keys is None:
            return self._move(None, ("dead",), "pending", now_at)
        return self._move(keys, ("dead", "dropped"), "pending", now_at)

    def drop(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Give up dead or held events (kept, marked dropped, for the record)."""
        return self._move(keys, ("dead", "held"), "dropped", now_at)

    def release(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Held events to pending (the next sync sends them); all held ones when ``keys`` is
        None. Returns how many were released."""
        return self._move(keys, ("held",), "pending", now_at)

    def replan(
        self,
        key: str,
        allocation: str,
        sku: str,
        new_key: str,
        body: Mapping[str, Any],
        now_at: datetime,
    ) -> bool:
        """A dead event re-mapped to ``allocation`` and ``sku`` (``outbox replan``), in ONE
        transaction: under the same key it goes back to pending; under a new key (the SKU is
        part of the key) a new pending row replaces it and the old one is dropped. False when
        the event is no longer dead."""
        self._writable()
        now = _epoch(now_at)
        with self._tx("replan an event") as cur:
            row = cur.execute(
                "SELECT quantity, started_at, ended_at FROM outbox WHERE event_key=? "
                "AND status='dead'",
                (key,),
            ).fetchone()
            if row is None:
                return False
            text = json.dumps(body, sort_keys=True)
            if new_key == key:
                cur.execute(
                    """UPDATE outbox SET allocation=?, sku=?, body=?, status='pending',
                       outcome_unknown=0, last_error='', updated_at=? WHERE event_key=?""",
                    (allocation, sku, text, now, key),
                )
                return True
            cur.execute(  # a key already stored means this stretch is planned: not twice
                """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity, started_at,
                   ended_at, body, status, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
                (new_key, allocation, sku, row[0], row[1], row[2], text, now, now),
            )
            if cur.rowcount:
                _add(cur, "totals", ("kind", "planned"), _counted([(allocation, sku, row[0])]))
            cur.execute(
                "UPDATE outbox SET status='dropped', last_error=?, updated_at=? WHERE event_key=?",
                (f"replanned as {new_key}", now, key),
            )
            return True

    def _move(
        self, keys: Optional[Sequence[str]], from_: Sequence[str], to: str, now_at: datetime
    ) -> int:
        self._writable()
        marks = ",".join("?" for _ in from_)
        sql = f"UPDATE outbox SET status=?, updated_at=? WHERE status IN ({marks})"
        if to == "pending":  # a row acknowledged once (then deleted on the API) has no body
            sql += " AND body != ''"
        with self._tx(f"move events to {to}") as cur:
            if keys is None:
                cur.execute(sql, (to, _epoch(now_at), *from_))
                return cur.rowcount
            count = 0
            for key in keys:
                cur.execute(sql + " AND event_key=?", (to, _epoch(now_at), *from_, key))
                count += cur.rowcount
            return count

    # ------------------------------------------------------------------ the API's record
    def floor_at(self) -> Optional[datetime]:
        """The billing floor: the start of the first sync's window (never billed before)."""
        value = self._meta("floor_at")
        return _time(int(value)) if value else None

    def set_floor(self, at: datetime) -> None:
        """Store the billing floor, once (a floor already stored is kept)."""
        self._writable()
        with self._tx("store the billing floor") as cur:
            cur.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('floor_at', ?)",
                (str(_epoch(at)),),
            )

    # ------------------------------------------------------------------ backfill resume
    def backfill_done_through(self, start_at: datetime, chunk_s: int) -> Optional[datetime]:
        """How far a backfill from ``start_at`` in chunks of ``chunk_s`` got (its chunks up to
        there are committed), when that is the backfill last left unfinished; else None."""
        value = self._meta("backfill")
        try:
            done = json.loads(value) if value else {}
            if done.get("start") == _epoch(start_at) and done.get("chunk") == chunk_s:
                return _time(int(done["doneThrough"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("the backfill progress in %s is unreadable: starting over", self.path)
        return None

    def set_backfill_done(
        self, start_at: datetime, chunk_s: int, through: Optional[datetime]
    ) -> None:
        """Remember that a backfill's chunks up to ``through`` are committed (None: it
        finished, nothing to resume)."""
        self._writable()
        with self._tx("record the backfill's progress") as cur:
            if through is None:
                cur.execute("DELETE FROM meta WHERE key = 'backfill'")
                return
            done = {"start": _epoch(start_at), "chunk": chunk_s, "doneThrough": _epoch(through)}
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('backfill', ?)",
                (json.dumps(done),),
            )

    def ledger_checked_at(self) -> Optional[datetime]:
        """Until when the API's events of this cluster were compared with this file."""
        value = self._meta("ledger_checked_at")
        return _time(int(value)) if value else None

    def known_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` this file's outbox holds (in any status)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" for _ in chunk)
            found.update(
                key
                for (key,) in self._query(
                    f"SELECT event_key FROM outbox WHERE event_key IN ({marks})", chunk
                )
            )
        return found

    def adopt(self, events: Sequence[AdoptedEvent], now_at: datetime, checked_at: datetime) -> int:
        """Take events the API holds but this file does not know (a lost, restored or replaced
        state file, or an agent taken over) as billed, in ONE transaction: each becomes an
        acknowledged outbox row and its run's progress covers it. Records that the API was
        compared up to ``checked_at``. Returns how many events were new to this file."""
        self._writable()
        now = _epoch(now_at)
        added = 0
        counted: list[tuple[str, str, str]] = []
        with self._tx("adopt the API's events") as cur:
            for event in events:
                cur.execute(
                    """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity,
                       started_at, ended_at, body, status, event_id, last_error, created_at,
                       updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, '', 'acked', ?, ?, ?, ?)""",
                    (
                        event.key,
                        event.allocation,
                        event.sku,
                        str(event.quantity),
                        _epoch(event.started_at),
                        _epoch(event.ended_at),
                        event.event_id,
                        "adopted: found on the API, posted by an earlier state or agent",
                        now,
                        now,
                    ),
                )
                if cur.rowcount:
                    added += 1
                    counted.append((event.allocation, event.sku, str(event.quantity)))
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, 0, ?)
                       ON CONFLICT (run) DO UPDATE SET
                         reported_s = max(reported_s, excluded.reported_s),
                         last_end_at = max(last_end_at, excluded.last_end_at),
                         updated_at = excluded.updated_at""",
                    (event.run, event.to_s, _epoch(event.ended_at), now),
                )
            cur.execute(
                """INSERT INTO meta (key, value) VALUES ('ledger_checked_at', ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (str(_epoch(checked_at)),),
            )
            counts = _counted(counted)  # adopted rows count as planned and acknowledged
            _add(cur, "totals", ("kind", "planned"), counts)
            _add(cur, "totals", ("kind", "posted"), counts)
            _add(cur, "acked_hours", ("hour", now // 3600), counts)
        return added

    # ------------------------------------------------------------------ quarantine
    def quarantine_rows(self, include_resolved: bool = False) -> list[QuarantineRow]:
        """Quarantined records, oldest first; only the open ones unless ``include_resolved``."""
        if self._schema < 2:  # a file of schema 1 opened read-only: it has none
            return []
        sql = f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine"
        if not include_resolved:
            sql += " WHERE resolved_at IS NULL"
        rows = []
        for key, job_id, reason, text, first, last, times, resolved in self._query(
            sql + " ORDER BY first_seen_at, key"
        ):
            first_at, last_at = _time(first), _time(last)
            assert first_at is not None and last_at is not None
            rows.append(
                QuarantineRow(key, job_id, reason, text, first_at, last_at, times, _time(resolved))
            )
        return rows

    def quarantine_count(self) -> int:
        """How many quarantined records are open."""
        if self._schema < 2:
            return 0
        return int(self._query("SELECT count(*) FROM quarantine WHERE resolved_at IS NULL")[0][0])

    # ------------------------------------------------------------------ housekeeping
    def prune(self, now_at: datetime, overlap_s: int, retention_s: int) -> tuple[int, int]:
        """Forget final runs that no future window can return, acknowledged events no longer
        needed, old dropped events and resolved quarantine entries; give free space back.

        A final run is kept while it could still appear in a window: it ended after the
        high-water mark minus the overlap, with a day to spare. Without a mark (only saved
        sacct files were read: they have no window) no progress is forgotten: a file may hold
        any run, and one that ended before a horizon and was never billed would be skipped as
        forgotten (the sync state machine's conservation check finds exactly that).

        An acknowledged event is kept ``retention_s`` after its acknowledgement, counted from
        the last comparison with the API's record when that is older (it reads the keys of the
        events created since: ledger.check). It was counted when acknowledged (``totals``,
        ``acked_hours``), so deleting it lowers no total. Dropped events and resolved
        quarantine entries are kept RECORD_RETENTION_S (or ``retention_s`` if longer).
        Returns (progress rows, outbox rows) deleted.
        """
        self._writable()
        now = _epoch(now_at)
        checked = self._meta("ledger_checked_at")
        acked_before = min(now, int(checked) if checked else now) - retention_s
        record_before = now - max(retention_s, RECORD_RETENTION_S)
        removed_runs = 0
        with self._tx("prune it") as cur:
            row = cur.execute("SELECT value FROM meta WHERE key='high_water_at'").fetchone()
            high = None if row is None else int(row[0])
            if high is not None:
                horizon = high - overlap_s - 86400
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
                "DELETE FROM outbox WHERE status='acked' AND updated_at < ?", (acked_before,)
            )
            removed_events = cur.rowcount
            cur.execute(
                "DELETE FROM outbox WHERE status='dropped' AND updated_at < ?", (record_before,)
            )
            removed_events += cur.rowcount
            cur.execute(
                "DELETE FROM quarantine WHERE resolved_at IS NOT NULL AND resolved_at < ?",
                (record_before,),
            )
            cur.execute("DELETE FROM acked_hours WHERE hour < ?", (now // 3600 - HOURS_KEPT,))
        self._give_back_free_pages()
        return removed_runs, removed_events

    def _give_back_free_pages(self) -> None:
        """With auto_vacuum=INCREMENTAL, free pages beyond a quarter of the file go back to the
        file system (below that they are kept for the next syncs' rows: no churn)."""
        with self._guard("compact it"), self._lock:
            (mode,) = self._conn.execute("PRAGMA auto_vacuum").fetchone()
            (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
            (pages,) = self._conn.execute("PRAGMA page_count").fetchone()
            if mode == 2 and free * VACUUM_FREE_SHARE > pages:
                # executescript steps the pragma to its end (execute frees only one page)
                self._conn.executescript(f"PRAGMA incremental_vacuum({int(free)});")

    def size(self) -> dict[str, int]:
        """The file's size in bytes (``file``: pages in use and free, ``free``: free pages)."""
        with self._guard("read it"), self._lock:
            (page,) = self._conn.execute("PRAGMA page_size").fetchone()
            (pages,) = self._conn.execute("PRAGMA page_count").fetchone()
            (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
        return {"file": int(page * pages), "free": int(page * free)}

    def record_sync(
        self, started_at: datetime, finished_at: datetime, outcome: str, summary: Mapping[str, Any]
    ) -> None:
        self._writable()
        with self._tx("record the sync") as cur:
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
        """Acknowledged quantity and events per allocation and SKU since ``since_at``, to the
        hour (the hour holding ``since_at`` counts whole), over the last HOURS_KEPT hours."""
        if self._schema < 4:  # an older file opened read-only: from its acknowledged rows
            rows = self._query(
                "SELECT allocation, sku, 1, quantity FROM outbox "
                "WHERE status='acked' AND updated_at>=?",
                (_epoch(since_at),),
            )
        else:
            rows = self._query(
                "SELECT allocation, sku, events, quantity FROM acked_hours WHERE hour >= ?",
                (_epoch(since_at) // 3600,),
            )
        sums: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for allocation, sku, events, quantity in rows:
            q, n = sums.get((allocation, sku), (Decimal(0), 0))
            sums[(allocation, sku)] = (q + Decimal(quantity), n + int(events))
        return [(a, s, q, n) for (a, s), (q, n) in sorted(sums.items())]

    def mark_deleted(self, keys: Iterable[str], reason: str, now_at: datetime) -> int:
        """Outbox rows of events deleted on the API (``slurm-tracker reconcile --repair``) become
        ``dropped`` with ``reason`` as their last error: kept for the record, never sent again by
        a sync, and not revived by ``outbox retry --all``. Returns how many rows changed."""
        self._writable()
        count = 0
        with self._tx("record deleted events") as cur:
            for key in dict.fromkeys(keys):
                cur.execute(
                    "UPDATE outbox SET status='dropped', last_error=?, updated_at=? "
                    "WHERE event_key=? AND status != 'dropped'",
                    (reason, _epoch(now_at), key),
                )
                count += cur.rowcount
        return count

    # ------------------------------------------------------------------ corrections
    @staticmethod
    def _note_corrections(
        cur: sqlite3.Cursor,
        corrections: Sequence[CorrectionSeen],
        final_seen: Mapping[str, int],
        now: int,
    ) -> None:
        """Inside commit_plan's transaction: record each correction found, or see it again.

        A new one is open. An open one takes the latest numbers. An applied one opens again
        (slurmdbd now says even less than it was corrected to); a dismissed one stays dismissed
        unless slurmdbd's seconds changed. ``final_seen`` (run -> ElapsedRaw of runs whose
        final record shows no over-billing): an open correction of such a run is out of date;
        it is dismissed, unless an apply already deleted events of the run (``removed``): then
        it takes the new seconds, and the next apply posts the deleted stretches up to them.
        """
        for seen in corrections:
            row = cur.execute(
                "SELECT status, actual_s FROM corrections WHERE run=?", (seen.run,)
            ).fetchone()
            values = (
                seen.job_id,
                json.dumps(list(seen.allocations)),
                json.dumps(list(seen.skus)),
                seen.billed_s,
                seen.actual_s,
                seen.record,
            )
            if row is None:
                cur.execute(
                    f"""INSERT INTO corrections ({_CORRECTION_COLUMNS})
                        VALUES (?, ?, ?, ?, ?, ?, ?, 'open', '[]', 0, '', ?, ?, 1, ?, NULL)""",
                    (seen.run, *values, now, now, now),
                )
                continue
            status, actual_s = row
            reopen = status == "applied" or (status == "dismissed" and actual_s != seen.actual_s)
            cur.execute(
                """UPDATE corrections SET job_id=?, allocations=?, skus=?, billed_s=?, actual_s=?,
                   record=?, last_seen_at=?, times_seen=times_seen+1, updated_at=?"""
                + (
                    ", status='open', removed='[]', attempts=0, note='', resolved_at=NULL"
                    if reopen
                    else ""
                )
                + " WHERE run=?",
                (*values, now, now, seen.run),
            )
        if not final_seen:
            return
        open_runs = [r for (r,) in cur.execute("SELECT run FROM corrections WHERE status='open'")]
        for run in open_runs:
            if run not in final_seen:
                continue
            elapsed = final_seen[run]
            cur.execute(
                """UPDATE corrections SET actual_s=?, last_seen_at=?, updated_at=?,
                   status = CASE WHEN removed='[]' THEN 'dismissed' ELSE status END,
                   resolved_at = CASE WHEN removed='[]' THEN ? ELSE resolved_at END,
                   note = CASE WHEN removed='[]' THEN ? ELSE note END
                   WHERE run=? AND status='open'""",
                (
                    elapsed,
                    now,
                    now,
                    now,
                    f"slurmdbd now says {elapsed} s, no less than what was billed: nothing to "
                    "correct",
                    run,
                ),
            )

    def corrections(self, include_closed: bool = False) -> list[CorrectionRow]:
        """Corrections, oldest first; only the open ones unless ``include_closed``."""
        if self._schema < 3:  # a file of an older schema opened read-only: it has none
            return []
        sql = f"SELECT {_CORRECTION_COLUMNS} FROM corrections"
        if not include_closed:
            sql += " WHERE status='open'"
        return [self._correction(r) for r in self._query(sql + " ORDER BY first_seen_at, run")]

    def correction(self, run: str) -> Optional[CorrectionRow]:
        if self._schema < 3:
            return None
        rows = self._query(f"SELECT {_CORRECTION_COLUMNS} FROM corrections WHERE run=?", (run,))
        return self._correction(rows[0]) if rows else None

    @staticmethod
    def _correction(r: Sequence[Any]) -> CorrectionRow:
        first, last, updated = _time(r[11]), _time(r[12]), _time(r[14])
        assert first is not None and last is not None and updated is not None
        return CorrectionRow(
            run=r[0],
            job_id=r[1],
            allocations=tuple(json.loads(r[2])),
            skus=tuple(json.loads(r[3])),
            billed_s=r[4],
            actual_s=r[5],
            record=r[6],
            status=r[7],
            removed=r[8],
            attempts=r[9],
            note=r[10],
            first_seen_at=first,
            last_seen_at=last,
            times_seen=r[13],
            updated_at=updated,
            resolved_at=_time(r[15]),
        )

    def correction_count(self) -> int:
        """How many corrections are open."""
        if self._schema < 3:
            return 0
        return int(self._query("SELECT count(*) FROM corrections WHERE status='open'")[0][0])

    def correction_removing(self, run: str, removed: str, now_at: datetime) -> None:
        """Before events of ``run`` are deleted on the API: what they bill (``removed``, JSON
        stretches, with those of earlier attempts), so that an attempt that stops after the
        deletion leaves the next one knowing what to post again."""
        self._writable()
        with self._tx(f"record the correction of run {run}") as cur:
            cur.execute(
                "UPDATE corrections SET removed=?, updated_at=? WHERE run=? AND status='open'",
                (removed, _epoch(now_at), run),
            )

    def correction_failed(self, run: str, note: str, now_at: datetime) -> None:
        """An attempt to apply the correction of ``run`` stopped (it stays open): why."""
        self._writable()
        with self._tx(f"record the correction of run {run}") as cur:
            cur.execute(
                "UPDATE corrections SET note=?, attempts=attempts+1, updated_at=? "
                "WHERE run=? AND status='open'",
                (note[:QUARANTINE_TEXT_MAX], _epoch(now_at), run),
            )

    def correction_applied(self, run: str, now_at: datetime) -> bool:
        """The API's record of ``run`` is corrected: in ONE transaction, the run's progress is
        set down to slurmdbd's seconds (the only place progress goes down) and the correction
        is marked applied. False when it was not open."""
        self._writable()
        now = _epoch(now_at)
        with self._tx(f"record the correction of run {run}") as cur:
            row = cur.execute(
                "SELECT actual_s FROM corrections WHERE run=? AND status='open'", (run,)
            ).fetchone()
            if row is None:
                return False
            cur.execute(
                "UPDATE progress SET reported_s=min(reported_s, ?), updated_at=? WHERE run=?",
                (row[0], now, run),
            )
            cur.execute(
                "UPDATE corrections SET status='applied', note='', attempts=attempts+1, "
                "resolved_at=?, updated_at=? WHERE run=?",
                (now, now, run),
            )
        return True

    def dismiss_corrections(self, runs: Sequence[str], note: str, now_at: datetime) -> int:
        """Open corrections of ``runs`` to dismissed (the over-billing stays on the API, on
        purpose). One whose apply already deleted events is not dismissed: the next apply must
        post their valid part again. Returns how many were dismissed."""
        self._writable()
        now = _epoch(now_at)
        count = 0
        with self._tx("dismiss corrections") as cur:
            for run in dict.fromkeys(runs):
                cur.execute(
                    "UPDATE corrections SET status='dismissed', note=?, resolved_at=?, "
                    "updated_at=? WHERE run=? AND status='open' AND removed='[]'",
                    (note[:QUARANTINE_TEXT_MAX], now, now, run),
                )
                count += cur.rowcount
        return count

    # ------------------------------------------------------------------ monitoring
    def recent_syncs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` recorded syncs, newest first (as last_sync gives one)."""
        rows = self._query(
            "SELECT started_at, finished_at, outcome, summary FROM syncs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            {
                "startedAt": _time(started),
                "finishedAt": _time(finished),
                "outcome": outcome,
                "summary": json.loads(summary),
            }
            for started, finished, outcome, summary in rows
        ]

    def posted_totals(self) -> dict[tuple[str, str], tuple[int, Decimal]]:
        """Cumulative (events, quantity) acknowledged per (allocation, SKU), counted as they
        are acknowledged: never lowered by pruning."""
        return self._totals("posted", _POSTED_TOTALS)

    def waiting_by_sku(self) -> dict[tuple[str, str, str], int]:
        """Undelivered events per (status, allocation, SKU): pending, sending, held, dead."""
        rows = self._query(
            "SELECT status, allocation, sku, count(*) FROM outbox "
            "WHERE status IN ('pending', 'sending', 'held', 'dead') GROUP BY 1, 2, 3"
        )
        return {(status, a, s): n for status, a, s, n in rows}

    def planned_totals(self) -> dict[tuple[str, str], tuple[int, Decimal]]:
        """Cumulative (events, quantity) planned into the outbox per (allocation, SKU), counted
        as they are stored."""
        return self._totals("planned", _PLANNED_TOTALS)

    def delivery_totals(self, kind: Literal["looked_up", "dead"]) -> dict[tuple[str, str], int]:
        """Cumulative events per (allocation, SKU) acknowledged because a look-up found them on
        the API (``looked_up``), or dead-lettered (``dead``; again after each retry)."""
        if self._schema < 4:
            return {}
        rows = self._query("SELECT allocation, sku, events FROM totals WHERE kind=?", (kind,))
        return {(a, s): int(n) for a, s, n in rows}

    def _totals(self, kind: str, older_name: str) -> dict[tuple[str, str], tuple[int, Decimal]]:
        if self._schema < 4:  # an older file opened read-only: as its last fold left them
            text = self._meta(older_name)
            data = json.loads(text) if text else {"totals": []}
            return {(a, s): (int(n), Decimal(q)) for a, s, n, q in data["totals"]}
        rows = self._query(
            "SELECT allocation, sku, events, quantity FROM totals WHERE kind=?", (kind,)
        )
        return {(a, s): (int(n), Decimal(q)) for a, s, n, q in rows}

    def outbox_statuses(self) -> dict[str, str]:
        """Every event key of the outbox with its status (no bodies read)."""
        return dict(self._query("SELECT event_key, status FROM outbox"))

    # ------------------------------------------------------------------ migration (issue 13)
    def import_progress(
        self,
        runs: Sequence[tuple[str, int, int, bool]],
        floor_at: datetime,
        note: Mapping[str, Any],
        now_at: datetime,
    ) -> int:
        """What the older Go agent billed (``slurm-tracker migrate state``), in ONE transaction:
        per run (identity text, elapsed seconds billed, wall-clock end of the billed part as
        epoch seconds, final), its progress; the billing floor and the high-water mark at
        ``floor_at``; ``note`` (JSON) kept as meta ``migrated_from``.

        Only into a state file that never billed: one with a floor, a high-water mark, progress
        or outbox rows is refused (StateError), nothing written. Returns the runs recorded."""
        self._writable()
        now = _epoch(now_at)
        with self._tx("record the migrated progress") as cur:
            used = [
                what
                for what, sql in (
                    ("a billing floor", "SELECT 1 FROM meta WHERE key='floor_at'"),
                    ("a high-water mark", "SELECT 1 FROM meta WHERE key='high_water_at'"),
                    ("a migration", "SELECT 1 FROM meta WHERE key='migrated_from'"),
                    ("progress rows", "SELECT 1 FROM progress LIMIT 1"),
                    ("outbox rows", "SELECT 1 FROM outbox LIMIT 1"),
                )
                if cur.execute(sql).fetchone() is not None
            ]
            if used:
                raise StateError(
                    f"state file {self.path} has already been used ({', '.join(used)}): the "
                    "old agent's progress can only be carried into a state file before its "
                    "first sync; nothing was written. Migrate into a new state file (--state)"
                )
            for run, seconds, end, final in runs:
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, ?, ?)""",
                    (run, seconds, end, int(final), now),
                )
            for key, value in (
                ("floor_at", str(_epoch(floor_at))),
                ("high_water_at", str(_epoch(_not_after_clock(floor_at)))),
                ("migrated_from", json.dumps(note, sort_keys=True)),
            ):
                cur.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return len(runs)

    def migration(self) -> Optional[dict[str, Any]]:
        """What ``import_progress`` noted (None when this file was not migrated)."""
        text = self._meta("migrated_from")
        if not text:
            return None
        try:
            note = json.loads(text)
        except ValueError:
            return {}
        return note if isinstance(note, dict) else {}


_POSTED_TOTALS = "posted_totals"  # meta (version 3): cumulative acknowledged events, folded
_PLANNED_TOTALS = "planned_totals"  # meta (version 3): cumulative events planned, folded


def _fold(
    cur: sqlite3.Cursor, name: str, column: str, condition: str
) -> dict[tuple[str, str], tuple[int, Decimal]]:
    """Add the outbox rows (matching ``condition``) whose ``column`` time is at or after the
    last fold's to the cumulative totals stored under ``name`` in meta (how version 3 kept
    them; used once, by the migration to version 4)."""
    row = cur.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
    data = json.loads(row[0]) if row else {}
    totals = {(a, s): (int(n), Decimal(q)) for a, s, n, q in data.get("totals", [])}
    through = int(data.get("through", -1))
    at_through = set(data.get("atThrough", []))
    for key, allocation, sku, quantity, at in cur.execute(
        f"SELECT event_key, allocation, sku, quantity, {column} FROM outbox "
        f"WHERE {condition}{column} >= ? ORDER BY {column}",
        (through,),
    ).fetchall():
        if at == through and key in at_through:
            continue
        if at > through:
            through, at_through = at, set()
        at_through.add(key)
        n, q = totals.get((allocation, sku), (0, Decimal(0)))
        totals[(allocation, sku)] = (n + 1, q + Decimal(quantity))
    data = {
        "totals": [[a, s, n, str(q)] for (a, s), (n, q) in sorted(totals.items())],
        "through": through,
        "atThrough": sorted(at_through),
    }
    cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (name, json.dumps(data)))
    return totals


Counts = dict[tuple[str, str], tuple[int, Decimal]]


def _counted(rows: Iterable[tuple[str, str, str]]) -> Counts:
    """(events, quantity) per (allocation, SKU) of rows (allocation, SKU, decimal text)."""
    counts: Counts = {}
    for allocation, sku, quantity in rows:
        n, q = counts.get((allocation, sku), (0, Decimal(0)))
        counts[(allocation, sku)] = (n + 1, q + Decimal(quantity))
    return counts


def _add(cur: sqlite3.Cursor, table: str, first: tuple[str, Any], counts: Counts) -> None:
    """Add ``counts`` to the rows of ``table`` (totals or acked_hours) whose first key column
    (``first``: name, value) has that value."""
    column, value = first
    for (allocation, sku), (added, quantity) in sorted(counts.items()):
        row = cur.execute(
            f"SELECT events, quantity FROM {table} WHERE {column}=? AND allocation=? AND sku=?",
            (value, allocation, sku),
        ).fetchone()
        n, q = (0, Decimal(0)) if row is None else (int(row[0]), Decimal(row[1]))
        cur.execute(
            f"INSERT OR REPLACE INTO {table} ({column}, allocation, sku, events, quantity) "
            "VALUES (?, ?, ?, ?, ?)",
            (value, allocation, sku, n + added, str(q + quantity)),
        )


def _count(cur: sqlite3.Cursor, kind: str, keys: Collection[str], status: str) -> None:
    """Count the rows of ``keys`` not in ``status`` yet (about to be) under ``kind``."""
    rows: list[tuple[str, str, str]] = []
    wanted = list(keys)
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ",".join("?" for _ in chunk)
        rows += cur.execute(
            f"SELECT allocation, sku, quantity FROM outbox WHERE event_key IN ({marks}) "
            "AND status != ?",
            [*chunk, status],
        ).fetchall()
    if rows:
        _add(cur, "totals", ("kind", kind), _counted(rows))


def _count_acked(cur: sqlite3.Cursor, keys: Collection[str], now: int) -> None:
    """Count the rows of ``keys`` not acknowledged yet (about to be) as posted, now."""
    rows: list[tuple[str, str, str]] = []
    wanted = list(keys)
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ",".join("?" for _ in chunk)
        rows += cur.execute(
            f"SELECT allocation, sku, quantity FROM outbox WHERE event_key IN ({marks}) "
            "AND status != 'acked'",
            chunk,
        ).fetchall()
    if rows:
        counts = _counted(rows)
        _add(cur, "totals", ("kind", "posted"), counts)
        _add(cur, "acked_hours", ("hour", now // 3600), counts)


def _carry_counts(cur: sqlite3.Cursor, now: int) -> None:
    """Migration to version 4: the cumulative totals that version 3 folded into meta (folded
    once more, so that rows since the last fold count) move to ``totals``; the acknowledged
    rows of the last HOURS_KEPT hours fill ``acked_hours``."""
    for name, kind, column, condition in (
        (_PLANNED_TOTALS, "planned", "created_at", ""),
        (_POSTED_TOTALS, "posted", "updated_at", "status='acked' AND "),
    ):
        _add(cur, "totals", ("kind", kind), _fold(cur, name, column, condition))
        cur.execute("DELETE FROM meta WHERE key=?", (name,))
    hours: dict[int, list[tuple[str, str, str]]] = {}
    for at, allocation, sku, quantity in cur.execute(
        "SELECT updated_at, allocation, sku, quantity FROM outbox "
        "WHERE status='acked' AND updated_at >= ?",
        (now - HOURS_KEPT * 3600,),
    ).fetchall():
        hours.setdefault(at // 3600, []).append((allocation, sku, quantity))
    for hour, rows in hours.items():
        _add(cur, "acked_hours", ("hour", hour), _counted(rows))


def _not_after_clock(at: datetime) -> datetime:
    """``at``, or the real clock when ``at`` is later (a typo, or a pinned ``--now``)."""
    clock = datetime.now(timezone.utc)
    if at > clock:
        log.warning(
            "the high-water mark may not move past the real clock: %s kept at %s",
            _iso(at),
            _iso(clock),
        )
        return clock
    return at
