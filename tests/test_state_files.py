"""The state file and its lock on a hostile or broken file system (issue 8, items 5 to 7).

Runs as root (as CI does): other owners are made with ``os.chown``, a full disk and a read-only
file system are real (a small tmpfs mounted for the test, remounted read-only), and an I/O error
on an open file is the kernel's (an immutable ``-wal`` on the test directory's file system).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker.errors import StateError, StateUnavailable, UnsafeFile
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import PlannedEvent, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import State, StateLock
from tests.factories import record

NOW = datetime(2026, 3, 11, tzinfo=timezone.utc)
CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")
NOBODY = 65534
FRESH_START_HINT = "would bill again everything in the window"


def events_for(job_id: str = "1", to_s: int = 3600) -> list[PlannedEvent]:
    return plan(split(record(job_id=job_id, elapsed_s=to_s), 0, to_s), "physics-2026", [CPU])


def store_events(store: State, events: list[PlannedEvent], hwm: datetime | None = None) -> int:
    return store.commit_plan(events, [request_body(e) for e in events], NOW, hwm)


def new_state(path: Path, *jobs: str) -> list[PlannedEvent]:
    """A real state file at ``path`` holding one event per job id, closed (WAL checkpointed)."""
    events = [e for job in jobs for e in events_for(job)]
    with State.open(path) as store:
        store_events(store, events, NOW)
    return events


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------- links, owners, modes
@pytest.mark.parametrize("readonly", [False, True])
def test_a_link_at_the_state_path_is_refused_and_its_target_untouched(
    tmp_path: Path, readonly: bool
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir(mode=0o700)
    path.symlink_to(victim)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        State.open(path, readonly=readonly)
    assert victim.read_bytes() == b"precious" and mode_of(victim) == 0o644
    assert listing(path.parent) == ["state.db"]  # no -wal, -shm or temporary file either


def test_a_dangling_link_at_the_state_path_is_not_followed_to_create_a_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "elsewhere.db"
    path = tmp_path / "state.db"
    path.symlink_to(target)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        State.open(path)
    assert not target.exists()
    assert listing(tmp_path) == ["state.db"]


def test_a_link_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    (tmp_path / "state.db.lock").symlink_to(victim)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        StateLock(tmp_path / "state.db").acquire(NOW)
    assert victim.read_bytes() == b"precious" and mode_of(victim) == 0o644


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_link_as_a_side_file_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / f"state.db{suffix}").symlink_to(victim)
    with pytest.raises(UnsafeFile, match=suffix):
        State.open(path)
    assert victim.read_bytes() == b"precious"


def test_a_side_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    wal = tmp_path / "state.db-wal"
    wal.write_bytes(b"")
    os.chown(wal, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match=r"state\.db-wal"):
        State.open(path)


def test_a_state_file_of_another_user_is_refused_for_writing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    events = new_state(path, "1")
    before = path.read_bytes()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match="uid 65534"):
        State.open(path)
    assert path.read_bytes() == before
    # a dry run or `status` only reads it: any owner will do
    with State.open(path, readonly=True) as store:
        assert [r.event_key for r in store.to_send()] == [events[0].event_key]


def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "state.db.lock"
    lock.write_bytes(b"pid 1 on somewhere")
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match="uid 65534"):
        StateLock(tmp_path / "state.db").acquire(NOW)
    assert lock.read_bytes() == b"pid 1 on somewhere"  # not truncated


@pytest.mark.parametrize("readonly", [False, True])
def test_a_state_file_others_can_write_is_refused(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    path.chmod(0o620)
    with pytest.raises(UnsafeFile, match="writable by group"):
        State.open(path, readonly=readonly)
    assert mode_of(path) == 0o620


def test_a_readable_state_file_of_ours_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    path.chmod(0o644)
    with State.open(path):
        pass
    assert mode_of(path) == 0o600


@pytest.mark.parametrize("opener", ["state", "lock"])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, opener: str) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(UnsafeFile, match="0777"):
        if opener == "state":
            State.open(folder / "state.db")
        else:
            StateLock(folder / "state.db").acquire(NOW)
    assert listing(folder) == []


def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match="uid 65534"):
        State.open(folder / "state.db")
    assert listing(folder) == []


def test_parent_directories_are_created_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    old = os.umask(0)
    try:
        with StateLock(path) as lock:
            lock.acquire(NOW)
            with State.open(path) as store:
                store_events(store, events_for("1"), NOW)
                side = [p for p in path.parent.iterdir() if p.name.startswith("state.db-")]
                assert side, "a WAL database has side files while open"
                assert {p.name: mode_of(p) for p in side} == {p.name: 0o600 for p in side}
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700
    assert mode_of(path) == 0o600
    assert mode_of(path.with_name("state.db.lock")) == 0o600


# ---------------------------------------------------------------------- not a state file of ours
def test_an_empty_state_file_is_an_error_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch(mode=0o600)
    for readonly in (False, True):
        with pytest.raises(StateError, match="empty") as caught:
            State.open(path, readonly=readonly)
        assert FRESH_START_HINT in str(caught.value)
        assert "restore the latest backup" in str(caught.value)
        assert path.stat().st_size == 0
        assert listing(tmp_path) == ["state.db"]


def test_a_file_that_is_not_sqlite_is_an_error_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"high_water_at=2026-03-01\n" * 400)
    path.chmod(0o600)
    for readonly in (False, True):
        with pytest.raises(StateError, match="not a slurm-tracker state file") as caught:
            State.open(path, readonly=readonly)
        assert FRESH_START_HINT in str(caught.value)
        assert path.read_bytes() == b"high_water_at=2026-03-01\n" * 400


def _sqlite_file(path: Path, *sql: str) -> bytes:
    conn = sqlite3.connect(path)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()
    path.chmod(0o600)
    return path.read_bytes()


@pytest.mark.parametrize(
    "sql",
    [
        # another application's database
        (
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO users VALUES (1, 'x')",
        ),
        # an empty SQLite database (no tables at all)
        ("PRAGMA user_version = 0",),
        # a meta table of another shape
        ("CREATE TABLE meta (k TEXT, v TEXT)", "INSERT INTO meta VALUES ('schema_version', '1')"),
        # our meta table, but another application's id in the header
        (
            "PRAGMA application_id = 1179408466",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "INSERT INTO meta VALUES ('schema_version', '1')",
        ),
        # a schema version of 1 without our tables
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "INSERT INTO meta VALUES ('schema_version', '1')",
        ),
    ],
    ids=["other-app", "empty-db", "other-meta", "other-app-id", "no-tables"],
)
def test_a_foreign_sqlite_file_is_an_error_and_left_as_it_is(
    tmp_path: Path, sql: tuple[str, ...]
) -> None:
    path = tmp_path / "state.db"
    before = _sqlite_file(path, *sql)
    for readonly in (False, True):
        with pytest.raises(StateError, match="not a slurm-tracker state file") as caught:
            State.open(path, readonly=readonly)
        assert FRESH_START_HINT in str(caught.value)
        assert path.read_bytes() == before
        assert listing(tmp_path) == ["state.db"]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StateError, match="version 99, newer"):
            State.open(path, readonly=readonly)
    assert path.read_bytes() == before


def test_a_new_state_file_carries_our_application_id(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x534C5452  # "SLTR"
    conn.close()


def test_a_state_file_created_meanwhile_is_opened_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    real_link = os.link
    winner: list[PlannedEvent] = []

    def racing_link(src: str, dst: str) -> None:
        monkeypatch.setattr(os, "link", real_link)
        winner.extend(new_state(path, "1"))  # another slurm-tracker creates it first
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with State.open(path) as store:
        assert [r.event_key for r in store.to_send()] == [winner[0].event_key]
    assert listing(tmp_path) == ["state.db"]  # the loser's temporary file is gone


# ---------------------------------------------------------------------- environmental faults
def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """A real, small file system of our own (mount -t tmpfs needs root, as CI has)."""
    where.mkdir(mode=0o700)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        _run("umount", "-l", str(where))


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; delete the result to free it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = 1 << 16
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return filler


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: even root's writes to the file (through open descriptors too) fail."""
    _run("chattr", "+i", str(path))
    try:
        yield
    finally:
        _run("chattr", "-i", str(path))


def test_disk_full_while_planning_and_acknowledging_loses_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "state" / "state.db"
        first = events_for("1")
        second = [e for job in ("2", "3", "4", "5") for e in events_for(job)]
        with State.open(path) as store:
            store_events(store, first, NOW - timedelta(hours=1))
            store.mark_sending(first[0].event_key, NOW)
            filler = fill(fs)
            with pytest.raises(StateUnavailable, match="disk is full"):
                store_events(store, second, NOW)
            with pytest.raises(StateUnavailable, match="disk is full"):
                store.mark_acked(first[0].event_key, "evt-1", NOW)
            # nothing of the failed plan, everything of the one before
            assert [r.event_key for r in store.to_send()] == [first[0].event_key]
            assert store.to_send()[0].status == "sending"
            assert store.high_water_at() == NOW - timedelta(hours=1)
            filler.unlink()  # space is freed: the same process carries on
            store.mark_acked(first[0].event_key, "evt-1", NOW)
            assert store_events(store, second, NOW) == len(second)
        with State.open(path) as store:  # and the next run sees all of it
            assert store.counts()["acked"] == 1
            assert {r.event_key for r in store.to_send()} == {e.event_key for e in second}
            assert store.high_water_at() == NOW
            assert store.integrity_problems() == []


def test_disk_full_when_creating_the_state_file_leaves_nothing_behind(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        folder = fs / "state"
        folder.mkdir(mode=0o700)
        filler = fill(fs)
        with pytest.raises(StateUnavailable, match=r"disk is full|No space left"):
            State.open(folder / "state.db")
        assert listing(folder) == []  # no empty state file, no temporary file
        filler.unlink()
        new_state(folder / "state.db", "1")
        with State.open(folder / "state.db", readonly=True) as store:
            assert len(store.to_send()) == 1


def test_a_read_only_file_system_is_temporary(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        path = fs / "state.db"
        events = new_state(path, "1")
        _run("mount", "-o", "remount,ro", str(fs))
        with pytest.raises(StateUnavailable, match="read-only"):
            StateLock(path).acquire(NOW)
        with pytest.raises(StateUnavailable, match="read-only"):
            State.open(path)
        with pytest.raises(StateUnavailable, match="read-only"):
            State.open(fs / "sub" / "state.db")  # cannot even create its directory
        with State.open(path, readonly=True) as store:  # a dry run still works
            assert [r.event_key for r in store.to_send()] == [events[0].event_key]
        _run("mount", "-o", "remount,rw", str(fs))
        with StateLock(path) as lock:
            lock.acquire(NOW)
            with State.open(path) as store:
                store.mark_acked(events[0].event_key, "evt-1", NOW)
                assert store.counts()["acked"] == 1


def test_an_io_error_on_an_open_state_file_is_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    events = events_for("1")
    with State.open(path) as store:
        store_events(store, events, NOW)
        wal = tmp_path / "state.db-wal"
        with immutable(wal), pytest.raises(StateUnavailable, match="I/O error"):
            store.mark_acked(events[0].event_key, "evt-1", NOW)
        assert store.to_send()[0].event_key == events[0].event_key
        store.mark_acked(events[0].event_key, "evt-1", NOW)
        assert store.counts()["acked"] == 1


def test_a_state_file_we_may_not_write_is_an_error_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    with immutable(path):
        with pytest.raises(StateError, match="permission") as caught:
            State.open(path)
        assert not isinstance(caught.value, StateUnavailable)
        assert "owns it" in str(caught.value)


def _pages(path: Path) -> tuple[int, set[int]]:
    """The page size, and the pages holding the meta table (and its index)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (size,) = conn.execute("PRAGMA page_size").fetchone()
        meta = {
            page
            for (page,) in conn.execute(
                "SELECT rootpage FROM sqlite_master WHERE tbl_name='meta' AND rootpage > 0"
            )
        }
    finally:
        conn.close()
    return size, meta


def _data_pages(path: Path) -> set[int]:
    """The pages of every table and index but the schema and the meta table (never the
    pointer-map pages of an auto_vacuum file either: dbstat does not list them)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = {
            page
            for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name NOT IN ('sqlite_schema', 'sqlite_master') "
                "AND name NOT IN "
                "(SELECT name FROM sqlite_master WHERE tbl_name='meta')"
            )
        }
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no dbstat table to find the outbox's pages")
    finally:
        conn.close()
    return pages


def _damage(path: Path, pages: Iterable[int], size: int) -> None:
    """Overwrite 64 bytes of each page (its cell pointers, after the page header)."""
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * size + 8)
            f.write(b"\xa5" * 64)


def test_damaged_pages_are_a_state_error_and_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    events = new_state(path, *(str(n) for n in range(1, 200)))
    with State.open(path) as store:
        for event in events[:50]:
            store.mark_acked(event.event_key, "evt", NOW - timedelta(days=60))
        assert store.integrity_problems() == []
    size, _ = _pages(path)
    pages = _data_pages(path)
    assert len(pages) > 20  # the outbox spans many pages
    _damage(path, pages, size)
    with State.open(path) as store:  # the header and meta are intact: it opens...
        problems = store.integrity_problems()
        assert any("page" in p for p in problems), problems
        with pytest.raises(StateError, match="damaged") as caught:
            store.prune(NOW, 3600, 30 * 86400)
        assert not isinstance(caught.value, StateUnavailable)
        assert FRESH_START_HINT in str(caught.value)
        with pytest.raises(StateError, match="damaged"):
            store.outbox()
    with State.open(path, readonly=True) as store:
        assert store.integrity_problems()


def test_a_damaged_meta_page_is_a_state_error_when_opening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    new_state(path, "1")
    size, meta = _pages(path)
    _damage(path, meta, size)
    for readonly in (False, True):
        with pytest.raises(StateError, match="damaged") as caught:
            State.open(path, readonly=readonly)
        assert not isinstance(caught.value, StateUnavailable)
