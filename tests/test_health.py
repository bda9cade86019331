"""Health an admin can alert on (issue 11): every sync outcome recorded, `status --check` as a
monitoring plugin, and the Prometheus textfile. Real syncs through the CLI against the API
emulator, with a fake sacct."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import Result
from prometheus_client.parser import text_string_to_metric_families

from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.errors import ConfigError
from slurm_tracker.state import StateLock
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, Emulator
from tests.factories import live_capture, write_fake_sacct

NOW = int(time.time())
T = (NOW // 60 - 180) * 60  # three hours ago


def job(number: int, elapsed: int = 1800) -> dict[str, str]:
    start = T + number * 60
    return {
        "JobID": str(number),
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(start - 30),
        "Start": str(start),
        "End": str(start + elapsed),
        "ElapsedRaw": str(elapsed),
        "State": "COMPLETED",
        "AllocTRES": "billing=2,cpu=2,mem=1G,node=1",
    }


class Site:
    """A config (with a `monitoring:` section), a fake sacct and the emulator."""

    def __init__(self, root: Path, emulator: Emulator) -> None:
        self.root = root / "site"
        self.root.mkdir(mode=0o700)
        self.capture = self.root / "capture.txt"
        self.capture.write_bytes(live_capture([]))
        self.sacct = self.root / "sacct"
        write_fake_sacct(self.sacct, self.capture)
        self.state = self.root / "state" / "state.db"
        self.metrics = self.root / "metrics" / "slurm_tracker.prom"
        self.metrics.parent.mkdir()
        self.config = self.root / "config.yaml"
        self.config.write_text(
            "cluster: box\n"
            f"state_file: {self.state}\n"
            "reporting_interval: 10m\n"
            f"api: {{organization: test-org, url: '{emulator.base_url}', max_attempts: 2, "
            "max_retry_time: 5s}\n"
            f"sacct: {{path: '{self.sacct}', lag: 1m}}\n"
            "accounts: {map: {physics: physics}}\n"
            "partitions: {map: {compute: CPU_HOUR}}\n"
            "monitoring:\n"
            f"  metrics_file: {self.metrics}\n"
            "  failed_syncs: {warning: 0, critical: 2}\n"
            "  dead_events: {warning: 0, critical: 10}\n"
        )

    def jobs(self, *rows: dict[str, str]) -> None:
        self.capture.write_bytes(live_capture(list(rows)))

    def break_sacct(self) -> None:
        self.sacct.write_text("#!/bin/sh\necho 'sacct: error: slurmdbd down' >&2\nexit 1\n")

    def mend_sacct(self) -> None:
        write_fake_sacct(self.sacct, self.capture)

    def run(self, *args: str) -> Result:
        return cli_runner().invoke(
            main, [*args, "--config", str(self.config)], env={"PW_API_KEY": DEFAULT_API_KEY}
        )

    def sync(self, code: int = 0) -> Result:
        result = self.run("sync", "--output", "json")
        assert result.exit_code == code, shown(result)
        return result

    def check(self, code: int) -> str:
        result = self.run("status", "--check")
        assert result.exit_code == code, shown(result)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, result.stdout  # ONE line, the plugin convention
        return lines[0]

    def metric_values(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.metrics.read_text()
        assert self.metrics.stat().st_mode & 0o777 == 0o644
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Emulator() as emulator:
        yield Site(tmp_path, emulator)


def test_no_state_file_is_unknown(site: Site) -> None:
    line = site.check(3)
    assert line.startswith("SLURM-TRACKER UNKNOWN - no state file at ")


def test_an_unreadable_state_is_unknown(site: Site) -> None:
    site.state.parent.mkdir(mode=0o700)
    site.state.write_bytes(b"this is not a database" * 100)
    line = site.check(3)
    assert line.startswith("SLURM-TRACKER UNKNOWN - state file ") and "unreadable" in line


def test_ok_warning_critical_by_failed_syncs(site: Site) -> None:
    site.jobs(job(1))
    site.sync()
    line = site.check(0)
    assert line.startswith("SLURM-TRACKER OK - last good sync ")
    assert "failed_syncs=0;0;2;0;" in line and "dead_events=0;0;10;0;" in line
    assert "last_success_age=" in line and "high_water_lag=" in line

    site.break_sacct()
    failed = site.run("sync")
    assert failed.exit_code not in (0, 4), shown(failed)
    assert "slurmdbd down" in failed.stderr  # the original error, unmasked
    line = site.check(1)
    assert line.startswith("SLURM-TRACKER WARNING - 1 failed syncs in a row")
    assert f"exit {failed.exit_code}" in line and "failed_syncs=1;0;2;0;" in line

    site.sync(code=failed.exit_code)  # the same exit code every time
    line = site.check(1)
    assert "failed_syncs=2;0;2;0;" in line
    site.sync(code=failed.exit_code)
    line = site.check(2)
    assert line.startswith("SLURM-TRACKER CRITICAL - 3 failed syncs in a row")

    # the failures are in the state's syncs table, with the code and the reason
    rows = sqlite3.connect(site.state).execute("SELECT outcome, summary FROM syncs").fetchall()
    assert [r[0] for r in rows] == ["ok", "failed", "failed", "failed"]
    assert json.loads(rows[-1][1])["exitCode"] == failed.exit_code
    assert json.loads(rows[-1][1])["reason"]

    status = site.run("status")
    assert "last sync" in status.stdout and "failed (exit" in status.stdout
    assert "failed syncs    3 in a row" in status.stdout
    info = json.loads(site.run("status", "--output", "json").stdout)
    assert info["check"]["state"] == "CRITICAL" and info["check"]["exitCode"] == 2
    assert info["check"]["metrics"]["failed_syncs"] == {
        "value": 3,
        "unit": None,
        "warning": 0,
        "critical": 2,
        "state": "CRITICAL",
    }
    assert info["syncs"]["failedSyncsInARow"] == 3

    site.mend_sacct()
    site.sync()
    site.check(0)
    as_json = json.loads(site.run("status", "--check", "--output", "json").stdout)
    assert as_json["check"]["state"] == "OK"


def test_a_failure_that_cannot_write_the_state_leaves_a_sidecar(site: Site) -> None:
    site.sync()
    with StateLock(site.state) as lock:
        lock.acquire(datetime.now(timezone.utc))
        held = site.run("sync")
        assert held.exit_code == 75, shown(held)
    sidecar = site.state.with_name("state.db.last-failure")
    data = json.loads(sidecar.read_text())
    assert sidecar.stat().st_mode & 0o777 == 0o600
    assert data["exitCode"] == 75 and "in use by another" in data["reason"]
    assert data["consecutive"] == 1
    line = site.check(1)
    assert "1 failed syncs in a row (last: exit 75" in line
    site.sync()  # a success clears it
    assert not sidecar.exists()
    site.check(0)


def test_no_successful_sync_is_critical(site: Site) -> None:
    site.break_sacct()
    assert site.run("sync").exit_code not in (0, 4)
    assert site.check(2).startswith("SLURM-TRACKER CRITICAL - no successful sync")


def test_the_high_water_text_is_not_misleading(site: Site) -> None:
    site.break_sacct()
    site.run("sync")
    status = site.run("status")
    assert "none (no sync has succeeded yet)" in status.stdout
    assert "no sync yet" not in status.stdout


def test_metrics_parse_and_counters_only_grow(site: Site) -> None:
    site.jobs(job(1))
    site.sync()
    first = site.metric_values()
    key = ("slurm_tracker_events_posted_total", (("allocation", "physics"), ("sku", "CPU_HOUR")))
    usage = ("slurm_tracker_usage_posted_total", key[1])
    planned = ("slurm_tracker_events_planned_total", key[1])
    assert first[key] >= 1 and first[usage] > 0 and first[planned] == first[key]
    assert first[("slurm_tracker_last_sync_success", ())] == 1
    assert first[("slurm_tracker_last_sync_records_read", ())] >= 1
    assert ("slurm_tracker_outbox_events", (("status", "dead"),)) in first
    assert first[("slurm_tracker_last_success_timestamp_seconds", ())] >= NOW - 60

    # pruning (here: every acknowledged event forgotten) never lowers the counters
    with sqlite3.connect(site.state) as conn:
        conn.execute("DELETE FROM outbox WHERE status='acked'")
    site.jobs(job(1), job(2))
    site.sync()
    second = site.metric_values()
    assert second[key] > first[key] and second[usage] > first[usage]
    assert second[planned] == second[key]  # each planned event counted once, pruned or not

    site.break_sacct()  # a failed sync writes the file too; counters stay
    site.run("sync")
    third = site.metric_values()
    assert third[key] == second[key] and third[usage] == second[usage]
    assert third[("slurm_tracker_last_sync_success", ())] == 0
    assert third[("slurm_tracker_failed_syncs_in_a_row", ())] == 1
    for name, value in second.items():
        if name[0].endswith("_total"):
            assert third[name] >= value


def test_monitoring_config_is_validated(tmp_path: Path) -> None:
    base = (
        "cluster: box\naccounts: {map: {physics: physics}}\n"
        "partitions: {map: {compute: CPU_HOUR}}\n"
    )
    config = config_from_text(base, str(tmp_path / "c.yaml"))
    assert config.monitoring.thresholds["failed_syncs"] == (2, 5)
    assert config.monitoring.metrics_file is None
    config = config_from_text(
        base + "monitoring: {last_success_age: {warning: 10m, critical: 1h}}\n",
        str(tmp_path / "c.yaml"),
    )
    assert config.monitoring.thresholds["last_success_age"] == (600, 3600)
    with pytest.raises(ConfigError, match="critical must not be below warning"):
        config_from_text(
            base + "monitoring: {dead_events: {warning: 5, critical: 1}}\n",
            str(tmp_path / "c.yaml"),
        )
    with pytest.raises(ConfigError, match="warnin"):
        config_from_text(
            base + "monitoring: {dead_events: {warnin: 5}}\n", str(tmp_path / "c.yaml")
        )
