"""Issue 8 through the command line (click's CliRunner): quarantine, held events, the clock,
empty or foreign state files, unsafe files, a full disk and a read-only file system, the
last-resort handler, and secrets.

Runs as root (as CI does): other owners are made with ``os.chown``; a full disk and a read-only
file system are a real small tmpfs mounted for the test. The sacct is a fake that serves
``capture.txt`` (tests.factories); the API is ``responses`` (tests.fake_api), or the
project's emulator for `catalog pull`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from click.testing import Result

from slurm_tracker import pipeline, rating, report
from slurm_tracker.cli import main
from slurm_tracker.state import State
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, DEFAULT_CATALOG, Emulator
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE, FakeApi, serving
from tests.test_cli import CONFIG, run

NOBODY = 65534
#: Runs of the last hours of the REAL clock: live syncs check plausibility against it, and
#: runs this recent are never pruned from the state between the syncs of a test.
T = int(time.time()) // 60 * 60 - 6 * 3600
SECRET = "secret-value"  # the secret part of the key tests.test_cli.run passes as PW_API_KEY


def job(
    job_id: str,
    *,
    cpu: int = 4,
    start: int = T,
    elapsed: int = 3600,
    end: Optional[int] = None,
    submit: int = T,
    **fields: str,
) -> dict[str, str]:
    """A finished run of account physics on partition compute (billed as physics-2026)."""
    return {
        "JobID": job_id,
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(submit),
        "Start": str(start),
        "End": str(start + elapsed if end is None else end),
        "ElapsedRaw": str(elapsed),
        "State": "COMPLETED",
        "AllocTRES": f"cpu={cpu},mem=4G,node=1,billing={cpu}",
        **fields,
    }


def core_hours(rows: list[dict[str, str]]) -> float:
    """What a capture of physics/compute runs is worth: cpu x ElapsedRaw / 3600 summed."""
    total = 0.0
    for row in rows:
        cpu = int(row["AllocTRES"].split("cpu=")[1].split(",")[0])
        total += cpu * int(row["ElapsedRaw"]) / 3600
    return total


GOOD = job("11")
POISON = job("21", start=T + 600, elapsed=600, end=T)  # End before Start
SANE = job("21", start=T + 600, elapsed=3600)  # the same run (JobIDRaw, Submit), fixed
RUN_21 = f"box:21:{T}"
GOOD_KEY = f"st1:box:11:{T}:0-3600:SLURM_CPU_HOUR"


def capture(site: Path, rows: list[dict[str, str]]) -> None:
    """What the fake sacct prints from now on."""
    (site / "capture.txt").write_bytes(live_capture(rows))


def edit_config(site: Path, old: str, new: str) -> None:
    path = site / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """config.yaml (tests.test_cli.CONFIG), a fake sacct serving capture.txt (holding GOOD)."""
    capture(tmp_path, [GOOD])
    write_fake_sacct(tmp_path / "fake-sacct", tmp_path / "capture.txt")
    (tmp_path / "config.yaml").write_text(CONFIG.format(base=BASE, sacct=tmp_path / "fake-sacct"))
    return tmp_path


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with serving(FakeApi()) as fake:
        yield fake


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, shown(result)
    return result


def one_error_line(result: Result) -> str:
    """The single line a failed command printed: no traceback, nothing escaped click."""
    out = shown(result)
    assert "Traceback" not in out, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("slurm-tracker: error: "), out
    return lines[0]


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


# ---------------------------------------------------------------------- 1. quarantine
def test_a_poison_record_is_quarantined_listed_and_billed_once_slurmdbd_shows_it_sane(
    site: Path, api: FakeApi
) -> None:
    capture(site, [GOOD, POISON])
    first = ok(run(site, "sync", "--output", "json"))
    summary = as_json(first)
    assert (summary["posted"], summary["rejected"], summary["outcome"]) == (1, 1, "ok")
    assert api.jobs() == ["11"]
    assert summary["rejectedRecords"][0]["quarantineKey"] == RUN_21

    table = ok(run(site, "quarantine", "list"))
    assert "21" in table.stdout and "is before Start" in table.stdout
    listed = as_json(ok(run(site, "quarantine", "list", "--output", "json")))
    assert [(q["key"], q["jobId"], q["timesSeen"], q["resolvedAt"]) for q in listed] == [
        (RUN_21, "21", 1, None)
    ]
    assert "End" in listed[0]["reason"] and "before Start" in listed[0]["reason"]
    assert as_json(ok(run(site, "status", "--output", "json")))["quarantined"] == 1
    assert "quarantined     1 records" in ok(run(site, "status")).stdout
    assert "1 quarantined records" in ok(run(site, "check")).stdout

    capture(site, [GOOD, SANE])  # an admin fixed the record in slurmdbd
    second = as_json(ok(run(site, "sync", "--output", "json")))
    assert (second["posted"], second["rejected"]) == (1, 0)
    assert api.jobs() == ["11", "21"]
    assert api.quantity() == pytest.approx(core_hours([GOOD, SANE]), abs=1e-6 * len(api.events))
    api.assert_exactly_once()
    assert ok(run(site, "quarantine", "list")).stdout.strip() == "no quarantined records"
    assert as_json(ok(run(site, "quarantine", "list", "--output", "json"))) == []
    resolved = as_json(ok(run(site, "quarantine", "list", "--all", "--output", "json")))
    assert [q["key"] for q in resolved] == [RUN_21] and resolved[0]["resolvedAt"] is not None
    assert resolved[0]["resolvedAt"] in ok(run(site, "quarantine", "list", "--all")).stdout
    assert as_json(ok(run(site, "status", "--output", "json")))["quarantined"] == 0

    ok(run(site, "sync"))  # and nothing is billed again
    assert len(api.events) == 2


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (job("21", start=T + 600, elapsed=600, end=T), "before Start"),
        (job("21", cpu=4294967293), r"limits\.max_cpus"),
        (job("21", start=T, end=int(datetime(9999, 1, 1).timestamp())), "9999"),
        (job("21", start=int(datetime(9999, 6, 1).timestamp())), "9999"),
        (job("21", elapsed=10 * 86400, end=T + 3600), "ElapsedRaw"),
        (job("21", ElapsedRaw="9" * 5000), "ElapsedRaw|5000 digits"),
        (job("21", submit=365 * 86400, start=365 * 86400), "before 2000"),
        (job("21", AllocTRES="cpu=4,mem=" + "9" * 400 + "T,node=1"), r"limits\.max_memory"),
    ],
    ids=[
        "end-before-start",
        "cpu-4294967293",
        "end-in-9999",
        "start-in-9999",
        "elapsed-beyond-end",
        "elapsed-5000-digits",
        "dated-1971",
        "huge-memory",
    ],
)
def test_each_kind_of_poison_record_is_quarantined_and_the_rest_billed(
    site: Path, api: FakeApi, poison: dict[str, str], reason: str
) -> None:
    capture(site, [GOOD, poison])
    summary = as_json(ok(run(site, "sync", "--output", "json")))
    assert (summary["posted"], summary["rejected"]) == (1, 1)
    assert api.jobs() == ["11"]
    listed = as_json(ok(run(site, "quarantine", "list", "--output", "json")))
    assert [q["jobId"] for q in listed] == ["21"]
    assert re.search(reason, listed[0]["reason"]), listed[0]["reason"]


def test_a_poison_record_read_by_several_syncs_is_one_entry(site: Path, api: FakeApi) -> None:
    capture(site, [GOOD, POISON])
    for _ in range(3):
        ok(run(site, "sync"))
    listed = as_json(ok(run(site, "quarantine", "list", "--output", "json")))
    assert len(listed) == 1 and listed[0]["timesSeen"] == 3
    assert listed[0]["lastSeenAt"] >= listed[0]["firstSeenAt"]
    assert as_json(ok(run(site, "status", "--output", "json")))["quarantined"] == 1
    assert api.jobs() == ["11"]


def test_terminal_escapes_in_a_quarantined_record_are_printed_escaped(
    site: Path, api: FakeApi
) -> None:
    hostile = job("31\x1b[2J\x1b]0;owned\x07", JobIDRaw="31", AllocTRES="cpu=4\x1b[2J,node=1")
    capture(site, [GOOD, hostile])
    sync = ok(run(site, "sync"))
    assert "\x1b" not in shown(sync)
    listed = as_json(ok(run(site, "quarantine", "list", "--output", "json")))
    assert len(listed) == 1 and listed[0]["jobId"].startswith("31\x1b[2J")
    for args in ([], ["-v"], ["--all"]):
        table = ok(run(site, "quarantine", "list", *args))
        assert "\x1b" not in shown(table) and "\x07" not in shown(table)
        assert "31\\x1b[2J" in table.stdout
    assert api.jobs() == ["11"]


# ---------------------------------------------------------------------- 2. held events
def test_an_event_above_hold_above_is_held_then_released_or_dropped(
    site: Path, api: FakeApi
) -> None:
    (site / "config.yaml").write_text(
        (site / "config.yaml").read_text() + "limits: {hold_above: 2}\n"
    )
    small, big, bigger = job("41", cpu=1), job("42", cpu=4), job("43", cpu=8)
    capture(site, [small, big, bigger])
    first = run(site, "sync", "--output", "json")
    assert first.exit_code == 4, shown(first)
    summary = as_json(first)
    assert (summary["posted"], summary["held"]) == (1, 2)
    assert api.jobs() == ["41"]

    held = as_json(ok(run(site, "outbox", "list", "--status", "held", "--output", "json")))
    keys = {e["eventKey"].split(":")[2]: e["eventKey"] for e in held}
    assert sorted(keys) == ["42", "43"] and {e["status"] for e in held} == {"held"}
    table = ok(run(site, "outbox", "list", "--status", "held")).stdout
    assert keys["42"] in table and keys["43"] in table and "held" in table
    assert run(site, "sync").exit_code == 4  # held events are not sent by a sync
    assert api.jobs() == ["41"]

    assert "1 event released" in ok(run(site, "outbox", "release", keys["42"])).stdout
    assert "0 events released" in ok(run(site, "outbox", "release", keys["42"])).stdout
    assert "1 event dropped" in ok(run(site, "outbox", "drop", keys["43"])).stdout
    second = as_json(ok(run(site, "sync", "--output", "json")))
    assert (second["posted"], second["held"], second["outcome"]) == (1, 0, "ok")
    assert api.jobs() == ["41", "42"]
    ok(run(site, "sync"))
    assert api.jobs() == ["41", "42"]
    api.assert_exactly_once()
    dropped = as_json(ok(run(site, "outbox", "list", "--status", "dropped", "--output", "json")))
    assert [e["eventKey"] for e in dropped] == [keys["43"]]


# ---------------------------------------------------------------------- 3. the clock
def test_now_is_refused_for_a_live_sync(site: Path, api: FakeApi) -> None:
    result = run(site, "sync", "--now", "2099-01-01T00:00:00Z")
    assert result.exit_code == 2
    assert "--now pins the clock" in shown(result)
    assert api.posts == 0 and not (site / "state.db").exists()


def test_a_first_sync_start_in_the_future_is_a_config_error(site: Path) -> None:
    edit_config(site, "backfill_pause: 0s}", "backfill_pause: 0s, first_sync_start: 2062-01-01}")
    for command in ("check", "sync"):
        result = run(site, command)
        assert result.exit_code == 3, shown(result)
        assert "sacct.first_sync_start" in shown(result) and "future" in shown(result)
    assert not (site / "state.db").exists()


def _set_mark_directly(path: Path, at: datetime) -> None:
    """What a broken older version did: the mark written with no check against the clock."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "UPDATE meta SET value=? WHERE key='high_water_at'", (str(int(at.timestamp())),)
            )
    finally:
        conn.close()


def _mark(site: Path) -> Optional[datetime]:
    conn = sqlite3.connect(f"file:{site / 'state.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='high_water_at'").fetchone()
    finally:
        conn.close()
    return datetime.fromtimestamp(int(row[0]), timezone.utc) if row else None


def test_a_high_water_mark_in_the_future_stops_the_sync_until_it_is_set_back(
    site: Path, api: FakeApi
) -> None:
    ok(run(site, "sync"))
    assert api.jobs() == ["11"]
    future = datetime(2099, 1, 1, tzinfo=timezone.utc)
    _set_mark_directly(site / "state.db", future)
    later = [GOOD, job("12"), job("13", cpu=2)]
    capture(site, later)

    refused = run(site, "sync")
    assert refused.exit_code == 3
    line = one_error_line(refused)
    assert "2099-01-01T00:00:00Z" in line and "in the future" in line
    assert "slurm-tracker state set-mark" in line
    assert api.jobs() == ["11"]
    info = as_json(ok(run(site, "status", "--output", "json")))
    assert info["highWaterInFuture"] is True
    assert "PROBLEM" in ok(run(site, "status")).stdout
    check = run(site, "check")
    assert check.exit_code == 3
    assert "high-water mark 2099-01-01T00:00:00Z is in the future" in shown(check)
    assert "state set-mark" in shown(check)

    good = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
    stamp = f"{good:%Y-%m-%dT%H:%M:%SZ}"
    dry = ok(run(site, "state", "set-mark", stamp))
    assert "would set" in dry.stdout and "--yes" in dry.stdout
    assert _mark(site) == future
    done = ok(run(site, "state", "set-mark", stamp, "--yes"))
    assert "2099-01-01T00:00:00Z -> " + stamp in done.stdout
    assert _mark(site) == good
    assert as_json(ok(run(site, "status", "--output", "json")))["highWaterInFuture"] is False
    ok(run(site, "check"))

    ok(run(site, "sync"))
    assert api.jobs() == ["11", "12", "13"]
    assert api.quantity() == pytest.approx(core_hours(later), abs=1e-6 * len(api.events))
    api.assert_exactly_once()


def test_set_mark_refuses_a_time_in_the_future(site: Path, api: FakeApi) -> None:
    ok(run(site, "sync"))
    before = _mark(site)
    result = run(site, "state", "set-mark", "2099-01-01T00:00:00Z", "--yes")
    assert result.exit_code == 3, shown(result)
    assert _mark(site) == before


# ---------------------------------------------------------------------- 4. empty, foreign
def _foreign(kind: str) -> Callable[[Path], object]:
    def sqlite_file(path: Path, *statements: str) -> None:
        path.unlink()
        conn = sqlite3.connect(path)
        try:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        finally:
            conn.close()

    makers: dict[str, Callable[[Path], object]] = {
        "empty": lambda p: p.write_bytes(b""),
        "not-sqlite": lambda p: p.write_bytes(b"not a database\n" * 300),
        "another-program": lambda p: sqlite_file(p, "CREATE TABLE notes (body TEXT)"),
        "another-application-id": lambda p: sqlite_file(
            p,
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "INSERT INTO meta VALUES ('schema_version', '2')",
            "PRAGMA application_id = 305419896",
        ),
        "newer-schema": lambda p: sqlite_file(
            p,
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "INSERT INTO meta VALUES ('schema_version', '99')",
            "PRAGMA application_id = 1397511250",
        ),
    }
    return makers[kind]


@pytest.mark.parametrize(
    "kind",
    ["empty", "not-sqlite", "another-program", "another-application-id", "newer-schema"],
)
def test_an_emptied_or_foreign_state_file_is_exit_3_and_bills_nothing_twice(
    site: Path, api: FakeApi, kind: str
) -> None:
    rows = [GOOD, job("12"), job("13")]
    capture(site, rows)
    ok(run(site, "sync"))
    assert len(api.events) == 3
    path = site / "state.db"
    _foreign(kind)(path)
    content = path.read_bytes()
    for command in (["sync"], ["sync", "--dry-run"], ["status"]):
        result = run(site, *command)
        assert result.exit_code == 3, (command, shown(result))
        line = one_error_line(result)
        assert str(path) in line
        if kind != "newer-schema":
            assert "restore the latest backup" in line
    assert len(api.events) == 3 and api.posts == 3
    assert path.read_bytes() == content  # left as it was, for the operator to look at


def test_a_missing_state_file_is_created_private_whatever_the_umask(
    site: Path, api: FakeApi
) -> None:
    path = site / "new" / "deeper" / "state.db"
    old = os.umask(0)
    try:
        ok(run(site, "sync", "--state", str(path)))
    finally:
        os.umask(old)
    assert api.jobs() == ["11"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for directory in (path.parent, path.parent.parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.db", "state.db.lock"]


# ---------------------------------------------------------------------- 5. unsafe files
def test_a_state_directory_others_can_write_is_refused(site: Path, api: FakeApi) -> None:
    folder = site / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    result = run(site, "sync", "--state", str(folder / "state.db"))
    assert result.exit_code == 3
    line = one_error_line(result)
    assert str(folder) in line and "writable by" in line and "chmod go-w" in line
    assert list(folder.iterdir()) == [] and api.posts == 0


def test_an_existing_state_directory_made_writable_later_is_refused(
    site: Path, api: FakeApi
) -> None:
    folder = site / "var"
    path = folder / "state.db"
    ok(run(site, "sync", "--state", str(path)))
    folder.chmod(0o777)
    capture(site, [GOOD, job("12")])
    for command in (["sync"], ["outbox", "release", "--all"]):
        result = run(site, *command, "--state", str(path))
        assert result.exit_code == 3, (command, shown(result))
        assert "writable by" in one_error_line(result)
    assert api.jobs() == ["11"]


def test_a_state_file_of_another_user_is_refused(site: Path, api: FakeApi) -> None:
    ok(run(site, "sync"))
    os.chown(site / "state.db", NOBODY, NOBODY)
    capture(site, [GOOD, job("12")])
    result = run(site, "sync")
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "belongs to" in line and "65534" in line
    assert api.jobs() == ["11"]


def test_a_state_directory_of_another_user_is_refused(site: Path, api: FakeApi) -> None:
    folder = site / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    result = run(site, "sync", "--state", str(folder / "state.db"))
    assert result.exit_code == 3
    assert "belongs to" in one_error_line(result)
    assert api.posts == 0


@pytest.mark.parametrize("command", [["sync"], ["check"], ["status"]])
def test_a_config_file_others_can_write_is_refused(
    site: Path, api: FakeApi, command: list[str]
) -> None:
    (site / "config.yaml").chmod(0o666)
    result = run(site, *command)
    assert result.exit_code == 3
    line = one_error_line(result)
    assert "config.yaml" in line and "writable by" in line
    assert api.posts == 0 and not (site / "state.db").exists()


def _emulator_catalog() -> dict[str, Any]:
    catalog = copy.deepcopy(dict(DEFAULT_CATALOG))
    del catalog["skus"]["gpu-hours"]["GPU_HOUR"]  # one code in two units: see test_catalog_admin
    return catalog


def _pull(config: Path, *args: str) -> Result:
    return cli_runner().invoke(
        main,
        ["catalog", "pull", "--config", str(config), *args],
        env={"PW_API_KEY": DEFAULT_API_KEY},
    )


def _catalog_site(directory: Path, url: str) -> Path:
    config = directory / "config.yaml"
    config.write_text(
        f"cluster: box\napi: {{organization: test-org, url: '{url}'}}\n"
        "accounts: {map: {physics: physics}}\npartitions: {map: {compute: CPU_HOUR}}\n"
        "catalog_file: catalog.yaml\n"
    )
    return config


def test_catalog_pull_writes_through_a_temporary_file_and_replaces_a_link(
    tmp_path: Path,
) -> None:
    site = tmp_path / "etc"
    site.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    with Emulator(_emulator_catalog()) as emulator:
        config = _catalog_site(site, emulator.base_url)
        old = os.umask(0)
        try:
            first = ok(_pull(config))
        finally:
            os.umask(old)
        target = site / "catalog.yaml"
        assert "written to" in first.stdout
        assert sorted(p.name for p in site.iterdir()) == ["catalog.yaml", "config.yaml"]
        assert stat.S_IMODE(os.lstat(target).st_mode) == 0o644
        assert b"CPU_HOUR" in target.read_bytes()

        target.unlink()
        target.symlink_to(victim)
        ok(_pull(config))
    info = os.lstat(target)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644
    assert rating.load_catalog_file(target).skus.keys() == {
        "CPU_HOUR",
        "GPU_HOUR",
        "MEM_GB_HOUR",
        "OLD_SKU",
    }
    assert victim.read_bytes() == b"precious"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert sorted(p.name for p in site.iterdir()) == ["catalog.yaml", "config.yaml"]


def test_catalog_pull_into_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "etc"
    site.mkdir()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with Emulator(_emulator_catalog()) as emulator:
        config = _catalog_site(site, emulator.base_url)
        result = _pull(config, "--file", str(open_dir / "catalog.yaml"))
    assert result.exit_code == 3, shown(result)
    assert "writable by" in one_error_line(result)
    assert list(open_dir.iterdir()) == []


# ---------------------------------------------------------------------- 6, 7. tmpfs faults
def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """A real, small file system of our own (mount -t tmpfs needs root, as CI has)."""
    where.mkdir(mode=0o700)
    _sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        _sh("umount", "-l", str(where))


FILL = """
def fill(directory):
    import errno, os
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = 1 << 16
        while size:
            try:
                os.write(fd, b"\\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return filler
"""
_space: dict[str, Any] = {}
exec(FILL, _space)  # the same code runs in the wrapping fake sacct below


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; delete the result to free it."""
    return Path(_space["fill"](str(directory)))


WRAPPER = '''#!{python}
"""Runs the fake sacct after recording its environment and/or filling a file system."""
import json, os, sys
{fill_code}
dump, full, real = {dump!r}, {full!r}, {real!r}
if dump:
    with open(dump, "w") as f:
        json.dump(dict(os.environ), f)
if full:
    fill(full)
os.execv(real, [real, *sys.argv[1:]])
'''


def wrap_sacct(site: Path, *, dump: Optional[Path] = None, full: Optional[Path] = None) -> None:
    """Make the site's sacct record its environment in ``dump``, or fill ``full``'s file system
    once it has been started (the state file is open by then: the plan's commit hits it)."""
    real = site / "real-sacct"
    write_fake_sacct(real, site / "capture.txt")
    wrapper = site / "fake-sacct"
    wrapper.write_text(
        WRAPPER.format(
            python=sys.executable,
            fill_code=FILL,
            dump=str(dump or ""),
            full=str(full or ""),
            real=str(real),
        )
    )
    wrapper.chmod(0o755)


def _state(fs: Path) -> str:
    return str(fs / "state" / "state.db")


NEW_RUNS = [job(str(100 + n), cpu=1 + n % 3, elapsed=600 * (n + 1)) for n in range(6)]


def test_a_disk_already_full_when_a_sync_starts_then_nothing_is_lost(
    site: Path, api: FakeApi
) -> None:
    with tmpfs(site / "fs") as fs:
        ok(run(site, "sync", "--state", _state(fs)))
        assert api.jobs() == ["11"]
        capture(site, [GOOD, *NEW_RUNS])
        filler = fill(fs)
        full = run(site, "sync", "--state", _state(fs))
        assert full.exit_code == 75, shown(full)
        one_error_line(full)
        assert api.jobs() == ["11"]
        filler.unlink()
        ok(run(site, "sync", "--state", _state(fs)))
    assert len(api.events) == 1 + len(NEW_RUNS)
    assert api.quantity() == pytest.approx(
        core_hours([GOOD, *NEW_RUNS]), abs=1e-6 * len(api.events)
    )
    api.assert_exactly_once()


def test_a_disk_already_full_when_a_sync_starts_is_called_a_full_disk(
    site: Path, api: FakeApi
) -> None:
    # SQLite reports a -shm file it cannot grow as SQLITE_IOERR_SHMSIZE ("disk I/O error"):
    # the message must still tell the operator that the disk is full, not an I/O error
    with tmpfs(site / "fs") as fs:
        ok(run(site, "sync", "--state", _state(fs)))
        fill(fs)
        full = run(site, "sync", "--state", _state(fs))
    assert full.exit_code == 75, shown(full)
    line = one_error_line(full)
    assert re.search(r"disk is full|No space left", line), line
    assert "an I/O error occurred" not in line, line


def test_catalog_pull_on_a_full_disk_is_temporary_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    site = tmp_path / "etc"
    site.mkdir()
    with Emulator(_emulator_catalog()) as emulator, tmpfs(tmp_path / "fs") as fs:
        config = _catalog_site(site, emulator.base_url)
        target = fs / "catalog.yaml"
        ok(_pull(config, "--file", str(target)))
        before = target.read_bytes()
        filler = fill(fs)
        full = _pull(config, "--file", str(target))
        assert full.exit_code == 75, shown(full)
        assert "No space left" in one_error_line(full)
        assert sorted(p.name for p in fs.iterdir()) == ["catalog.yaml", "filler"]
        assert target.read_bytes() == before  # the old catalog is still whole
        filler.unlink()
        ok(_pull(config, "--file", str(target)))
        assert sorted(p.name for p in fs.iterdir()) == ["catalog.yaml"]


def test_a_disk_filling_up_while_planning_loses_nothing(site: Path, api: FakeApi) -> None:
    with tmpfs(site / "fs") as fs:
        ok(run(site, "sync", "--state", _state(fs)))
        capture(site, [GOOD, *NEW_RUNS])
        wrap_sacct(site, full=fs)  # the disk fills while sacct runs: the commit hits it
        full = run(site, "sync", "--state", _state(fs))
        assert full.exit_code == 75, shown(full)
        assert "disk is full" in one_error_line(full)
        assert api.jobs() == ["11"]
        (fs / "filler").unlink()
        write_fake_sacct(site / "fake-sacct", site / "capture.txt")
        ok(run(site, "sync", "--state", _state(fs)))
        with sqlite3.connect(f"file:{_state(fs)}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(api.events) == 1 + len(NEW_RUNS)
    assert api.quantity() == pytest.approx(
        core_hours([GOOD, *NEW_RUNS]), abs=1e-6 * len(api.events)
    )
    api.assert_exactly_once()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_disk_filling_up_while_delivering_loses_nothing_and_posts_nothing_twice(
    site: Path, api: FakeApi, concurrency: int
) -> None:
    edit_config(site, "max_retry_time: 1s}", f"max_retry_time: 1s, concurrency: {concurrency}}}")
    with tmpfs(site / "fs") as fs:
        ok(run(site, "sync", "--state", _state(fs)))
        capture(site, [GOOD, *NEW_RUNS])
        fillers: list[Path] = []

        def fill_after_the_second_post(accepted: int) -> None:
            # GOOD was accepted by the first sync; then one new event is acked as usual, and
            # the next one is accepted by the API but its ack cannot be recorded
            if accepted == 3 and not fillers:
                fillers.append(fill(fs))

        api.after_post = fill_after_the_second_post
        full = run(site, "sync", "--state", _state(fs))
        assert fillers, "the disk was never filled"
        assert full.exit_code == 75, shown(full)
        assert "disk is full" in one_error_line(full)
        api.after_post = None
        fillers[0].unlink()
        with State.open(Path(_state(fs)), readonly=True) as store:
            rows = store.outbox()
        acked = {r.event_key for r in rows if r.status == "acked"}
        unknown = {r.event_key for r in rows if r.status == "sending"}
        assert len(rows) == 1 + len(NEW_RUNS)
        assert GOOD_KEY in acked and unknown  # unknown: the events whose ack was not recorded
        assert unknown <= set(api.keys()) and acked <= set(api.keys())
        if concurrency == 1:
            # outcomes are recorded in batches (delivery.py, group commit): the full disk shows
            # when the batch's acks are written, after its POSTs: every new event is unknown
            new = len(NEW_RUNS)
            assert (len(acked), len(unknown), len(api.events)) == (1, new, 1 + new)
        again = as_json(ok(run(site, "sync", "--state", _state(fs), "--output", "json")))
        assert again["foundByLookup"] == len(unknown)  # looked up, not posted again
        assert again["posted"] == len(rows) - len(acked)
    assert len(api.events) == 1 + len(NEW_RUNS)
    assert api.quantity() == pytest.approx(
        core_hours([GOOD, *NEW_RUNS]), abs=1e-6 * len(api.events)
    )
    api.assert_exactly_once()


def test_a_read_only_file_system_is_temporary(site: Path, api: FakeApi) -> None:
    with tmpfs(site / "fs") as fs:
        ok(run(site, "sync", "--state", _state(fs)))
        capture(site, [GOOD, *NEW_RUNS])
        _sh("mount", "-o", "remount,ro", str(fs))
        try:
            refused = run(site, "sync", "--state", _state(fs))
            assert refused.exit_code == 75, shown(refused)
            assert "read-only" in one_error_line(refused)
            assert api.jobs() == ["11"]
            dry = ok(run(site, "sync", "--dry-run", "--state", _state(fs), "--output", "json"))
            assert len(as_json(dry)["events"]) == len(NEW_RUNS)  # a dry run still works
        finally:
            _sh("mount", "-o", "remount,rw", str(fs))
        ok(run(site, "sync", "--state", _state(fs)))
    assert len(api.events) == 1 + len(NEW_RUNS)
    api.assert_exactly_once()


# ---------------------------------------------------------------------- 8. last resort
def test_an_unexpected_exception_is_one_line_and_exit_1(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the planner\nexploded")

    monkeypatch.setattr(pipeline, "plan_stream", broken)  # the dry run plans in batches
    args = ["sync", "--dry-run", "--sacct-file", str(site / "capture.txt")]
    result = run(site, *args)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith("slurm-tracker: error: unexpected RuntimeError: the planner exploded")
    assert "-vv" in line
    detailed = run(site, *args, "-vv")
    assert detailed.exit_code == 1
    assert "Traceback (most recent call last)" in detailed.stderr
    assert "RuntimeError: the planner" in detailed.stderr
    assert isinstance(detailed.exception, SystemExit)


def test_an_unexpected_exception_after_delivery_is_exit_1_and_nothing_is_lost(
    site: Path, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise RuntimeError("cannot render")

    monkeypatch.setattr(report, "sync_text", broken)
    result = run(site, "sync")
    assert result.exit_code == 1
    assert one_error_line(result).startswith(
        "slurm-tracker: error: unexpected RuntimeError: cannot render"
    )
    assert api.jobs() == ["11"]
    monkeypatch.undo()
    ok(run(site, "sync"))
    assert api.jobs() == ["11"]


# ---------------------------------------------------------------------- 9. secrets
def _windows(secret: str, width: int = 6) -> list[str]:
    return [secret[i : i + width] for i in range(len(secret) - width + 1)]


def test_a_key_file_passed_as_config_is_not_echoed(site: Path) -> None:
    secret = "Zm9vYmFyLXNlY3JldC1wYXJ0LTQyNDI0Mg"
    keyfile = site / "api-key"
    keyfile.write_text(f"pwt_dGVzdA.{secret}\n")
    keyfile.chmod(0o600)
    result = cli_runner().invoke(main, ["check", "--config", str(keyfile)])
    assert result.exit_code == 3, shown(result)
    out = shown(result)
    assert str(keyfile) in out
    leaked = [w for w in _windows(secret) if w in out]
    assert not leaked, out


def test_a_key_pasted_into_a_config_field_is_not_echoed(site: Path) -> None:
    secret = "c2VjcmV0LXBhc3RlZC1pbnRvLWNvbmZpZw"
    edit_config(site, "max_attempts: 2", f"max_attempts: 2, connect_timeout: pwt_dGVzdA.{secret}")
    result = run(site, "check")
    assert result.exit_code == 3, shown(result)
    assert "connect_timeout" in shown(result)
    leaked = [w for w in _windows(secret) if w in shown(result)]
    assert not leaked, shown(result)


def test_sacct_gets_an_allow_listed_environment_never_the_api_key(site: Path, api: FakeApi) -> None:
    dump = site / "sacct-env.json"
    wrap_sacct(site, dump=dump)
    env = {
        "PW_PLATFORM_HOST": "api.test",
        "SACCT_FORMAT": "JobID",
        "SLURM_TIME_FORMAT": "relative",
        "MY_TOKEN": f"pwt_dGVzdA.{SECRET}",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "LC_ALL": "C.UTF-8",
    }
    result = run(site, "sync", env=env)
    assert result.exit_code == 0, shown(result)
    assert api.jobs() == ["11"]
    seen = json.loads(dump.read_text())
    assert "PW_API_KEY" not in seen and "PW_PLATFORM_HOST" not in seen
    assert "MY_TOKEN" not in seen and "SACCT_FORMAT" not in seen
    assert not [k for k, v in seen.items() if SECRET in v]
    assert seen["TZ"] == "UTC" and seen["SLURM_TIME_FORMAT"] == "%s"
    assert seen["SLURM_CONF"] == "/etc/slurm/slurm.conf" and seen["LC_ALL"] == "C.UTF-8"
    allowed = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TMPDIR", "TZ"}
    allowed |= {"LD_LIBRARY_PATH", "SLURM_CONF", "SLURM_JWT", "SLURM_TIME_FORMAT"}
    assert {k for k in seen if not k.startswith("LC_")} <= allowed
    assert SECRET not in shown(result)


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [(0o600, 0, ""), (0o644, 0, "readable by"), (0o600, NOBODY, "belongs to")],
    ids=["private", "readable-by-others", "another-owner"],
)
def test_the_api_key_file_must_be_private_and_ours(
    site: Path, api: FakeApi, mode: int, owner: int, problem: str
) -> None:
    secret = "a2V5LWZpbGUtc2VjcmV0LTk4NzY1NDMyMQ"
    keyfile = site / "api-key"
    keyfile.write_text(f"pwt_dGVzdA.{secret}\n")
    keyfile.chmod(mode)
    os.chown(keyfile, owner, owner)
    edit_config(site, "max_attempts: 2", f'max_attempts: 2, api_key_file: "{keyfile}"')
    result = run(site, "sync")
    if not problem:
        ok(result)
        assert api.jobs() == ["11"]
        return
    assert result.exit_code == 3
    line = one_error_line(result)
    assert problem in line and str(keyfile) in line
    assert not [w for w in _windows(secret) if w in shown(result)]
    assert api.posts == 0


# ---------------------------------------------------------------------- quarantine, later
OLD = T - 3 * 86400  # runs three days old: the state has pruned what it billed then
OLD_GOOD = job("11", submit=OLD, start=OLD)
OLD_POISON = job("22", submit=OLD, start=OLD + 600, elapsed=600, end=OLD)  # End before Start
OLD_SANE = job("22", submit=OLD, start=OLD + 600, elapsed=3600)


def _at(epoch: int) -> str:
    return f"{datetime.fromtimestamp(epoch, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def _quarantine_three_days_ago(site: Path, api: FakeApi) -> None:
    # The agent went live four days ago (its billing floor), so three-day-old runs are billed.
    config = site / "config.yaml"
    text = config.read_text()
    assert "backfill_pause: 0s}" in text
    config.write_text(
        text.replace(
            "backfill_pause: 0s}", f'backfill_pause: 0s, first_sync_start: "{_at(OLD - 86400)}"}}'
        )
    )
    capture(site, [OLD_GOOD, OLD_POISON])
    assert as_json(ok(run(site, "sync", "--output", "json")))["rejected"] == 1
    assert api.jobs() == ["11"]
    status = as_json(ok(run(site, "status", "--output", "json")))
    assert status["quarantined"] == 1
    with State.open(site / "state.db", readonly=True) as store:
        pruned = store.pruned_before()
    assert pruned is not None and pruned.timestamp() > OLD + 4200  # run 22 is "forgotten"


def test_a_quarantined_run_is_not_resolved_by_a_record_that_is_not_billed(
    site: Path, api: FakeApi
) -> None:
    # The sane record of run 22 is skipped ("ended before <pruned_before> ... may have been
    # billed already"), yet the quarantine entry is marked resolved: the run is neither billed
    # nor listed any more. Nothing may disappear silently: billed, or still in the quarantine.
    _quarantine_three_days_ago(site, api)
    capture(site, [OLD_SANE])
    ok(run(site, "sync", "--sacct-file", str(site / "capture.txt")))
    open_entries = as_json(ok(run(site, "quarantine", "list", "--output", "json")))
    assert "22" in api.jobs() or [q["jobId"] for q in open_entries] == ["22"], (
        api.jobs(),
        open_entries,
    )


def test_a_backfill_over_a_quarantined_runs_period_bills_it_once_fixed(
    site: Path, api: FakeApi
) -> None:
    # README, "No record can stop a sync": "When slurmdbd later shows a sane record of the same
    # run (an admin fixed it with sacctmgr), the next sync or a backfill over its period bills
    # it as usual". A regular sync only re-reads the last sacct.overlap (1 h) before the mark,
    # so a record fixed a day later is only billed by a backfill, which is refused (exit 2)
    # once the state has pruned that period: such a run can then never be billed.
    _quarantine_three_days_ago(site, api)
    capture(site, [OLD_GOOD, OLD_SANE])
    result = run(site, "backfill", "--start", _at(OLD - 3600), "--end", _at(OLD + 86400))
    assert result.exit_code == 0, shown(result)
    assert api.jobs() == ["11", "22"]
    api.assert_exactly_once()
    assert as_json(ok(run(site, "quarantine", "list", "--output", "json"))) == []
