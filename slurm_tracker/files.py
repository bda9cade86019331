"""Opening the files the agent trusts, the way ssh's StrictModes does.

The state file (and its lock), the catalog, the configuration and the API key decide what is
billed and where the key goes. A file another local user could write, replace or point
elsewhere must never be used:

* the final component is opened with ``O_NOFOLLOW`` (a symbolic link is refused) and checked
  on the open descriptor (``fstat``), so nothing can be swapped between the check and the use;
* it must be a regular file, not writable by group or others, and owned by the running user
  (files the agent writes) or by the running user or root (files it only reads);
* its directory and every ancestor must be owned by the running user or root, and must not be
  writable by group or others (an ancestor may be, when it is sticky like ``/tmp``: others
  can then neither rename nor replace what is ours inside it);
* directories the agent creates are created 0700 whatever the umask, and files it writes
  atomically go through a fresh ``O_EXCL`` temporary file in the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
import tempfile
from pathlib import Path

from slurm_tracker.errors import UnsafeFile

_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_directory(directory: Path, what: str) -> None:
    """Refuse ``directory`` when a user other than us or root could change what is in it.

    ``what`` names the file that lives there (for the message). Symbolic links on the way are
    resolved first; every component of the real path is checked.
    """
    real = Path(os.path.realpath(directory))
    for index, current in enumerate([real, *real.parents]):
        try:
            info = os.stat(current)
        except OSError as exc:
            raise UnsafeFile(
                f"{what}: cannot check directory {current}: {exc.strerror or exc}"
            ) from exc
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeFile(f"{what}: {current} is not a directory")
        if not _trusted_owner(info.st_uid):
            raise UnsafeFile(
                f"{what}: directory {current} belongs to {_user(info.st_uid)}, who could replace "
                f"the file; use a directory owned by {_user(os.geteuid())} or root"
            )
        writable = info.st_mode & _GROUP_OTHER_WRITE
        sticky_ancestor = index > 0 and info.st_mode & stat.S_ISVTX
        if writable and not sticky_ancestor:
            raise UnsafeFile(
                f"{what}: directory {current} is writable by "
                f"{_whom(info.st_mode)} (mode {stat.S_IMODE(info.st_mode):04o}), who could "
                f"replace the file: run `chmod go-w {current}` or use another directory"
            )


def _whom(mode: int) -> str:
    both = (mode & stat.S_IWGRP) and (mode & stat.S_IWOTH)
    return "group and others" if both else ("group" if mode & stat.S_IWGRP else "others")


def ensure_private_dir(directory: Path, what: str) -> None:
    """Create ``directory`` (and missing parents) with mode 0700 whatever the umask; check it.

    The deepest existing ancestor is checked before anything is created in it. OSErrors of
    ``mkdir`` (EROFS, ENOSPC, EACCES...) are the caller's.
    """
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    if missing:
        check_directory(current, what)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made by someone else meanwhile: check_directory judges it
        # mkdir's mode is masked by the umask: set it through a descriptor of the directory
        # itself, never by name (which a link could redirect)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    check_directory(directory, what)


def check_open_file(
    fd: int,
    path: Path,
    what: str,
    *,
    owned_by_us: bool,
    private: bool = False,
    any_owner: bool = False,
) -> os.stat_result:
    """Check an open descriptor: a regular file nobody else can write (or read, ``private``).

    ``owned_by_us``: the running user must own it (files we write); else root may too, or
    anybody with ``any_owner`` (files only displayed, never acted upon: a dry run's state).
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"{what} {path} is not a regular file")
    if owned_by_us and info.st_uid != os.geteuid():
        raise UnsafeFile(
            f"{what} {path} belongs to {_user(info.st_uid)}, not to {_user(os.geteuid())} who "
            "runs slurm-tracker: another user could have written it. Check where it comes from; "
            "if it is yours, `chown` it"
        )
    if not owned_by_us and not any_owner and not _trusted_owner(info.st_uid):
        raise UnsafeFile(
            f"{what} {path} belongs to {_user(info.st_uid)}: only files of "
            f"{_user(os.geteuid())} or root are trusted"
        )
    mode = stat.S_IMODE(info.st_mode)
    if info.st_mode & _GROUP_OTHER_WRITE:
        raise UnsafeFile(
            f"{what} {path} is writable by {_whom(info.st_mode)} (mode {mode:04o}): "
            f"run `chmod go-w {path}`"
        )
    if private and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UnsafeFile(
            f"{what} {path} is readable by group or others (mode {mode:04o}): run "
            f"`chmod 600 {path}`"
        )
    return info


def open_nofollow(path: Path, flags: int, what: str, mode: int = 0o600) -> int:
    """``os.open`` of the final component without following a symbolic link.

    A link is an UnsafeFile; other OSErrors (ENOENT, EACCES, EROFS...) are the caller's.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise UnsafeFile(
                f"{what} {path} is a symbolic link: name the file itself, not a link "
                "(another user could point a link elsewhere)"
            ) from exc
        raise


def read_trusted(path: Path, what: str, *, limit: int, private: bool = False) -> bytes:
    """The bytes of a file the agent only reads (configuration, catalog, API key).

    Refused (UnsafeFile) when it is a link, not a regular file, owned by another user than us
    or root, or writable by others, or when its directory is unsafe; ``private`` also refuses
    one readable by others. Other OSErrors are the caller's. At most ``limit`` bytes are read:
    a larger file is refused.
    """
    check_directory(path.parent, f"{what} {path}")
    # O_NONBLOCK: a FIFO put in its place must not hang the agent (check_open_file refuses it)
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, what)
    try:
        check_open_file(fd, path, what, owned_by_us=False, private=private)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFile(
                    f"{what} {path} is larger than {limit} bytes: is it the right file?"
                )
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a half.

    Written to a fresh temporary file (``O_EXCL``, unpredictable name) in the same directory,
    given ``mode`` (whatever the umask), flushed to disk, renamed over ``path`` and the directory
    synced. Nothing is left behind on failure (disk full included); OSErrors are the caller's.
    """
    directory = path.parent
    check_directory(directory, f"file {path}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp_name, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (best effort on odd file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
