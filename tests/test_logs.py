"""Log lines: journald priorities, JSON, syslog, one line per record, the sync summary."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_tracker import logs
from tests.conftest import shown
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE, FakeApi, serving
from tests.test_cli import CONFIG, ROWS, run

log = logging.getLogger("slurm_tracker.test")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    sacct = tmp_path / "fake-sacct"
    capture = tmp_path / "capture.txt"
    capture.write_bytes(live_capture(ROWS))
    write_fake_sacct(sacct, capture)
    (tmp_path / "config.yaml").write_text(CONFIG.format(base=BASE, sacct=sacct))
    return tmp_path


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    root = logging.getLogger(logs.ROOT)
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []


class FileStream(io.TextIOWrapper):
    """A text stream on a real file, whose (device, inode) can name the journal stream."""


def journal_env(path: Path) -> dict[str, str]:
    info = os.stat(path)
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_under_journald_lines_carry_the_syslog_priority(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with open(path, "w", encoding="utf-8") as stream:
        logs.setup(0, False, environ=journal_env(path), stream=stream)
        log.warning("disk %s", "almost full")
        log.error("gone")
        log.info("not shown at the default level")
    assert path.read_text().splitlines() == [
        "<4>slurm-tracker: warning: disk almost full",
        "<3>slurm-tracker: error: gone",
    ]


def test_no_prefix_when_stderr_is_not_the_journal_stream(tmp_path: Path) -> None:
    # JOURNAL_STREAM is inherited by children whose stderr was redirected: it must match
    path = tmp_path / "elsewhere"
    other = tmp_path / "journal"
    other.touch()
    with open(path, "w", encoding="utf-8") as stream:
        logs.setup(0, False, environ=journal_env(other), stream=stream)
        log.warning("plain")
    assert path.read_text() == "slurm-tracker: warning: plain\n"
    assert not logs.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    assert not logs.under_journald(io.StringIO(), {"JOURNAL_STREAM": "garbage"})


def test_no_text_can_split_or_forge_a_log_line() -> None:
    stream = io.StringIO()
    logs.setup(0, False, environ={}, stream=stream)
    log.warning("job name %s", "x\n<2>slurm-tracker: critical: forged\x1b[31m")
    assert stream.getvalue().count("\n") == 1
    assert "\\n<2>slurm-tracker: critical: forged\\x1b[31m" in stream.getvalue()


def test_json_lines_with_fields_and_the_summary_at_the_default_level() -> None:
    stream = io.StringIO()
    logs.setup(0, False, log_format="json", environ={}, stream=stream)
    log.warning("dead events")
    log.info("detail, not shown without -v")
    logs.summary(logging.INFO, "sync ok in 1.0 s", {"posted": 3, "outcome": "ok"})
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["level"], x["priority"], x["message"]) for x in lines] == [
        ("warning", 4, "dead events"),
        ("info", 6, "sync ok in 1.0 s"),
    ]
    assert lines[1]["fields"] == {"posted": 3, "outcome": "ok"}
    assert lines[1]["logger"] == logs.SUMMARY and lines[0]["time"].endswith("Z")


def test_the_format_can_come_from_the_environment() -> None:
    stream = io.StringIO()
    logs.setup(0, True, environ={"SLURM_TRACKER_LOG_FORMAT": "json"}, stream=stream)
    logs.summary(logging.INFO, "quiet: no summary", {})
    log.error("shown")
    assert [json.loads(x)["message"] for x in stream.getvalue().splitlines()] == ["shown"]


def test_a_failure_is_one_error_line_or_one_json_object() -> None:
    text = io.StringIO()
    logs.setup(0, False, environ={}, stream=text)
    logs.failure("sacct failed\nsecond line", 75, stream=text)
    assert text.getvalue() == "slurm-tracker: error: sacct failed\nsecond line\n"
    as_json = io.StringIO()
    logs.setup(0, False, log_format="json", environ={}, stream=as_json)
    logs.failure("sacct failed", 75, stream=as_json)
    (line,) = as_json.getvalue().splitlines()
    assert json.loads(line)["fields"] == {"outcome": "failed", "exitCode": 75}


def test_syslog_gets_info_and_the_summary_even_when_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", address)
    stream = io.StringIO()
    try:
        logs.setup(0, True, syslog=True, environ={}, stream=stream)
        logs.summary(logging.INFO, "sync ok in 1.0 s", {})
        log.debug("not at INFO")
        log.error("broken\nline")
        first = server.recv(4096).decode()
        second = server.recv(4096).decode()
    finally:
        server.close()
    # facility daemon (3): priority 3 * 8 + 6 for info, 3 * 8 + 3 for err
    assert first.startswith("<30>slurm-tracker[") and first.endswith("info: sync ok in 1.0 s\x00")
    assert second.startswith("<27>") and "error: broken\\nline" in second
    assert stream.getvalue() == "slurm-tracker: error: broken\\nline\n"  # -q: errors only


def test_without_a_syslog_socket_it_says_so_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "missing"))
    stream = io.StringIO()
    logs.setup(0, False, syslog=True, environ={}, stream=stream)
    assert "no local syslog" in stream.getvalue()


# ------------------------------------------------------------------ the command line
def test_a_sync_logs_one_summary_line(site: Path) -> None:
    fake = FakeApi()
    with serving(fake):
        result = run(site, "sync", "--log-format", "json")
    assert result.exit_code == 0, shown(result)
    summaries = [
        json.loads(x) for x in result.stderr.splitlines() if '"slurm_tracker.summary"' in x
    ]
    assert len(summaries) == 1
    fields = summaries[0]["fields"]
    assert fields["kind"] == "sync" and fields["outcome"] == "ok"
    assert (fields["records"], fields["planned"], fields["posted"], fields["dead"]) == (4, 3, 3, 0)
    assert fields["windowStart"] and fields["windowEnd"] and fields["seconds"] >= 0
    assert summaries[0]["message"].startswith("sync ok in ")


def test_a_failing_command_writes_its_error_as_json(site: Path) -> None:
    (site / "config.yaml").write_text("cluster: [\n")
    result = run(site, "sync", "--log-format", "json")
    assert result.exit_code == 3
    (line,) = result.stderr.splitlines()
    doc = json.loads(line)
    assert doc["level"] == "error" and doc["fields"]["exitCode"] == 3


def test_dead_events_are_summarised_in_one_warning(site: Path) -> None:
    fake = FakeApi()
    fake.mode = "reject-gpu"
    with serving(fake):
        result = run(site, "sync")
        verbose = run(site, "outbox", "list", "--status", "dead", "--output", "json")
    assert result.exit_code == 4, shown(result)
    warnings = [x for x in result.stderr.splitlines() if "dead-lettered" in x]
    assert len(warnings) == 1, warnings  # and the sync's summary line, at WARNING (exit 4)
    assert any(
        x.startswith("slurm-tracker: warning: sync undelivered in ")
        for x in (result.stderr.splitlines())
    )
    assert (
        "1 events dead-lettered (chemistry-2026 SLURM_GPU_HOUR: 1); the first: st1:"
        in (warnings[0])
    )
    assert "SKU archived" in warnings[0]
    assert len(json.loads(verbose.stdout)) == 1
