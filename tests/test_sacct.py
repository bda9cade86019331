"""Running sacct: command line, environment, and failures, with fake sacct programs."""

from __future__ import annotations

import json
import re
import shlex
import stat
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker.errors import SacctUnavailable, TemporaryFailure
from slurm_tracker.sacct import (
    CAPTURE_DELIMITER,
    LIVE_FIELDS,
    build_command,
    live_fields,
    new_delimiter,
    run_sacct,
    sacct_environment,
)

UTC = timezone.utc


def _fake(tmp_path: Path, name: str, body: str) -> Path:
    """An executable Python script standing in for sacct."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_constants_other_modules_rely_on() -> None:
    assert CAPTURE_DELIMITER == "|#|"
    assert LIVE_FIELDS[-1] == "JobName"
    assert {"Cluster", "JobIDRaw", "Submit", "Start", "End", "ElapsedRaw", "AllocTRES"} <= set(
        LIVE_FIELDS
    )


D = new_delimiter()


def test_new_delimiter_is_fresh_and_unpredictable() -> None:
    seen = {new_delimiter() for _ in range(1000)}
    assert len(seen) == 1000
    for delimiter in seen:
        assert re.fullmatch(r"\|~[0-9a-f]{32}~\|", delimiter)  # 128 random bits


def test_build_command() -> None:
    argv = build_command(
        "/usr/bin/sacct",
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 12, 30, 5, tzinfo=UTC),
        ["--accounts=physics"],
        delimiter=D,
        fields=live_fields(with_job_name=True),
        clusters=("c1", "c2"),
    )
    assert argv == [
        "/usr/bin/sacct",
        "--allusers",
        "--allocations",
        "--duplicates",
        "--parsable",
        f"--delimiter={D}",
        "--format=Cluster,JobID,JobIDRaw,Account,Partition,User,Group,QOS,Submit,Eligible,"
        "Start,End,ElapsedRaw,State,ExitCode,AllocTRES,NNodes,NodeList,Reservation,JobName",
        "--starttime",
        "2026-01-01T00:00:00",
        "--endtime",
        "2026-01-01T12:30:05",
        "--clusters=c1,c2",
        "--accounts=physics",
    ]
    assert "--noheader" not in argv


def test_job_names_are_fetched_only_when_asked_for() -> None:
    assert live_fields(with_job_name=True)[-1] == "JobName"
    assert "JobName" not in live_fields(with_job_name=False)
    argv = build_command(
        "sacct",
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 2, tzinfo=UTC),
        delimiter=D,
        fields=live_fields(with_job_name=False),
    )
    assert not any("JobName" in arg for arg in argv)


@pytest.mark.parametrize("delimiter", ["|#|", "|", "|~0123~|", ""])
def test_build_command_refuses_a_predictable_delimiter(delimiter: str) -> None:
    with pytest.raises(ValueError, match="new_delimiter"):
        build_command(
            "sacct",
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 2, tzinfo=UTC),
            delimiter=delimiter,
        )


def test_build_command_keeps_job_name_last() -> None:
    with pytest.raises(ValueError, match="last"):
        build_command(
            "sacct",
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 2, tzinfo=UTC),
            delimiter=D,
            fields=("JobName", "JobIDRaw"),
        )


def test_build_command_converts_to_utc() -> None:
    oslo_winter = timezone(timedelta(hours=1))
    argv = build_command(
        "sacct",
        datetime(2026, 1, 1, 1, 0, tzinfo=oslo_winter),
        datetime(2026, 1, 2, 1, 0, tzinfo=oslo_winter),
        delimiter=D,
    )
    assert argv[-4:] == ["--starttime", "2026-01-01T00:00:00", "--endtime", "2026-01-02T00:00:00"]


def test_build_command_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_command("sacct", datetime(2026, 1, 1), datetime(2026, 1, 2, tzinfo=UTC), delimiter=D)


def test_sacct_environment_is_an_allow_list() -> None:
    base = {
        "PATH": "/usr/bin",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "TZ": "Europe/Oslo",
        "SLURM_TIME_FORMAT": "relative",
        "SACCT_FORMAT": "JobID,State",
        "SACCT_FEDERATION": "1",
        "SACCT_LOCAL": "1",
        "SACCT_SOMETHING_NEW": "x",
        "SLURM_BITSTR_LEN": "8",
        "SLURM_JSON": "compact",
        "SLURM_YAML": "compact",
        "SLURM_CLUSTERS": "other",
        "PW_API_KEY": "pwt_c2VjcmV0.never-for-sacct",
        "PW_PLATFORM_HOST": "api.example.org",
        "SLURM_TRACKER_CONFIG": "/etc/slurm-tracker/config.yaml",
        "LD_PRELOAD": "/tmp/evil.so",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
    }
    env = sacct_environment(base)
    assert env == {
        "PATH": "/usr/bin",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "SLURM_TIME_FORMAT": "%s",
    }
    assert base["TZ"] == "Europe/Oslo"  # the caller's mapping is left alone


def test_run_sacct_success_passes_argv_and_environment(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    fake = _fake(
        tmp_path,
        "sacct",
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(seen)!r}, 'w'))\n"
        "sys.stdout.buffer.write(b'Cluster|#|JobID|#|\\n\\xff raw bytes|#|\\n')\n"
        "sys.stderr.write('a warning\\n')",
    )
    argv = build_command(
        str(fake), datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC), delimiter=D
    )
    environ = sacct_environment(
        {"PATH": "/usr/bin:/bin", "SACCT_FORMAT": "JobID", "PW_API_KEY": "pwt_x.y"}
    )

    out = run_sacct(argv, timeout_s=30, environ=environ)

    assert out == b"Cluster|#|JobID|#|\n\xff raw bytes|#|\n"
    recorded = json.loads(seen.read_text())
    assert recorded["argv"] == argv[1:]
    assert recorded["env"]["TZ"] == "UTC"
    assert recorded["env"]["SLURM_TIME_FORMAT"] == "%s"
    assert "SACCT_FORMAT" not in recorded["env"]
    assert "PW_API_KEY" not in recorded["env"]


def test_run_sacct_never_uses_a_shell(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    fake = _fake(tmp_path, "sacct", f"json.dump(sys.argv[1:], open({str(seen)!r}, 'w'))")
    run_sacct([str(fake), "$(touch pwned)", "a b;c"], timeout_s=30, environ={})
    assert json.loads(seen.read_text()) == ["$(touch pwned)", "a b;c"]
    assert not (tmp_path / "pwned").exists()


def test_run_sacct_non_zero_exit(tmp_path: Path) -> None:
    lines = "".join(f"line {i}\\n" for i in range(30))
    fake = _fake(
        tmp_path,
        "sacct",
        f"sys.stderr.write('{lines}sacct: error: Problem talking to the database\\n')\nsys.exit(1)",
    )
    argv = [str(fake), "--starttime", "2026-01-01T00:00:00", "--format=a b"]
    with pytest.raises(SacctUnavailable) as caught:
        run_sacct(argv, timeout_s=30, environ={})
    message = str(caught.value)
    assert "exit status 1" in message
    assert shlex.join(argv) in message
    assert "'--format=a b'" in message  # shell-quoted
    assert "Problem talking to the database" in message
    assert "line 29" in message
    assert "line 0\n" not in message  # only the last lines of stderr
    assert "temporary" in message
    assert isinstance(caught.value, TemporaryFailure)


def test_run_sacct_killed_by_a_signal(tmp_path: Path) -> None:
    fake = _fake(tmp_path, "sacct", "import signal; os.kill(os.getpid(), signal.SIGTERM)")
    with pytest.raises(SacctUnavailable, match="killed by signal 15"):
        run_sacct([str(fake)], timeout_s=30, environ={})


def test_run_sacct_timeout_kills_it(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    fake = _fake(
        tmp_path,
        "sacct",
        "sys.stderr.write('started\\n'); sys.stderr.flush()\n"
        f"time.sleep(5)\nopen({str(marker)!r}, 'w').close()",
    )
    with pytest.raises(SacctUnavailable) as caught:
        run_sacct([str(fake), "-X"], timeout_s=0.5, environ={})
    message = str(caught.value)
    assert "timed out after 0.5 s" in message
    assert f"{fake} -X" in message
    assert "temporary" in message


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, just not reaped yet


def test_run_sacct_timeout_kills_what_it_started(tmp_path: Path) -> None:
    """A wrapper script's child (holding the pipes open) is killed too, not left behind."""
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "sacct"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nwait\n")
    fake.chmod(0o755)
    with pytest.raises(SacctUnavailable, match="timed out"):
        run_sacct([str(fake)], timeout_s=1, environ={"PATH": "/usr/bin:/bin"})
    child = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL was sent; give the kernel a moment to finish it
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


def test_run_sacct_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sacct"
    with pytest.raises(SacctUnavailable) as caught:
        run_sacct([str(missing), "--allusers"], timeout_s=30, environ={})
    message = str(caught.value)
    assert "could not be started" in message
    assert f"{missing} --allusers" in message
    assert "temporary" in message
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_run_sacct_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "sacct"
    path.write_text("not a program")
    with pytest.raises(SacctUnavailable, match="could not be started"):
        run_sacct([str(path)], timeout_s=30, environ={})
