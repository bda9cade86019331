"""The state file's safety: faults of the environment translated into the domain's errors
(never a sqlite3 or OS error: a full disk, a read-only file system, an I/O error or a busy
database are ``StateUnavailable``, temporary; a damaged or foreign file ``StateError``), the
checks of its side files, and the lock beside it that names its holder."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sqlite3
import stat
from datetime import datetime
from pathlib import Path
from typing import Optional

from slurm_tracker import files
from slurm_tracker.errors import LockHeld, StateError, StateUnavailable, TrackerError, UnsafeFile
from slurm_tracker.state_rows import iso

FRESH_START_HINT = (
    "A fresh start would bill again everything in the window (the API cannot refuse a "
    "duplicate): restore the latest backup of the state file, or move this file aside only "
    "if you know nothing was billed from it"
)
NOTHING_LOST = "nothing is lost: the next run continues where this one stopped"

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


def translate(exc: sqlite3.Error, path: Path, doing: str) -> TrackerError:
    """The domain error for a sqlite3 error met while ``doing`` something with the file."""
    code = _sqlite_code(exc)
    if code == 10 and _disk_full(path):
        code = 13  # SQLite says "disk I/O error" when it cannot grow the -shm file
    if code in _SQLITE_TEMPORARY:
        return StateUnavailable(
            f"state file {path}: cannot {doing}: {_SQLITE_TEMPORARY[code]} ({exc}); {NOTHING_LOST}"
        )
    if code in _SQLITE_CORRUPT:
        return StateError(
            f"state file {path} cannot be used: it is damaged or is not a slurm-tracker state "
            f"file ({exc}; while trying to {doing}). `slurm-tracker check` lists the damage. "
            f"{FRESH_START_HINT}"
        )
    return StateError(f"state file {path}: cannot {doing}: {exc}")


def _disk_full(path: Path) -> bool:
    """Whether the file system of ``path`` has no block left for this user."""
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def is_bug(exc: sqlite3.Error) -> bool:
    """Errors of our own making (bad SQL, a constraint, a closed connection): not translated."""
    bug = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
    code = _sqlite_code(exc)
    return isinstance(exc, bug) and code not in _SQLITE_TEMPORARY and code not in _SQLITE_CORRUPT


def os_failure(exc: OSError, path: Path, doing: str, what: str = "state file") -> TrackerError:
    """The domain error for an OSError met while opening, creating or locking the file."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    reason = exc.strerror or str(exc)
    if exc.errno in _OS_TEMPORARY:
        return StateUnavailable(
            f"{what} {path}: cannot {doing}: {_OS_TEMPORARY[exc.errno]} ({reason}{where}); "
            f"{NOTHING_LOST}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StateError(
            f"{what} {path}: cannot {doing}: permission denied ({reason}{where}). Run "
            "slurm-tracker as the user who owns it, and check that this user may write the "
            "file and its directory and that the file is not immutable (`lsattr`)"
        )
    return StateError(f"{what} {path}: cannot {doing}: {reason}{where}")


def check_side_file(side: Path, writer: bool) -> None:
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


def refuse_empty(info: os.stat_result, path: Path) -> None:
    if info.st_size == 0:
        raise StateError(
            f"state file {path} exists but is empty (truncated or replaced?): only a missing "
            f"state file is created. {FRESH_START_HINT}"
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
            raise os_failure(exc, self.path, "create or open it", what) from exc
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
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {iso(now_at)}"
            os.pwrite(fd, holder.encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise os_failure(exc, self.path, "lock it", what) from exc
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
