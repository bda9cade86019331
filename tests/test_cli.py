"""The command line through click's CliRunner: exit codes, the table, the JSON document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import responses
from click.testing import Result

from slurm_tracker.cli import main
from slurm_tracker.state import State, StateLock
from tests.conftest import cli_runner, shown
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE, FakeApi, serving

T = (int(time.time()) // 60 - 180) * 60  # three hours ago: live syncs bill the last day
CONFIG = """
cluster: box
state_file: state.db
reporting_interval: 10m
api: {{organization: org, url: "{base}", max_attempts: 2, max_retry_time: 1s}}
sacct: {{path: "{sacct}", timeout: 5s, backfill_pause: 0s}}
accounts: {{map: {{physics: physics-2026, chemistry: chemistry-2026}}}}
partitions:
  map:
    compute: SLURM_CPU_HOUR
    gpu: [{{sku: SLURM_GPU_HOUR, metric: gpu}}, {{sku: SLURM_CPU_HOUR, metric: cpu}}]
catalog:
  units:
    - name: core-hours
      ratedInUsd: false
      skus: [{{code: SLURM_CPU_HOUR, rules: []}}]
    - name: usd
      ratedInUsd: true
      rules: [{{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 0.04}}]
      skus:
        - code: SLURM_GPU_HOUR
          rules: [{{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 2.5}}]
"""
ROWS = [
    # 4 cores for 1 h, finished
    {
        "JobID": "11",
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(T),
        "Start": str(T),
        "End": str(T + 3600),
        "ElapsedRaw": "3600",
        "State": "COMPLETED",
        "AllocTRES": "cpu=4,mem=4G,node=1,billing=4",
    },
    # 2 GPUs + 8 cores for 30 min, failed: state names do not matter
    {
        "JobID": "12",
        "Account": "chemistry",
        "Partition": "gpu",
        "Submit": str(T),
        "Start": str(T),
        "End": str(T + 1800),
        "ElapsedRaw": "1800",
        "State": "OUT_OF_MEMORY",
        "AllocTRES": "cpu=8,gres/gpu:a100=2,gres/gpu=2,mem=16G,node=1",
    },
    {
        "JobID": "13",
        "Account": "unmapped-lab",
        "Partition": "compute",
        "Submit": str(T),
        "Start": str(T),
        "End": str(T + 60),
        "ElapsedRaw": "60",
        "State": "COMPLETED",
        "AllocTRES": "cpu=1,node=1",
    },
    {
        "JobID": "14",
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(T),
        "Start": "Unknown",
        "End": "Unknown",
        "ElapsedRaw": "0",
        "State": "PENDING",
        "AllocTRES": "",
    },
]
DRY_RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["events", "skipped", "rejected", "totals"],
    "properties": {
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "allocation",
                    "sku",
                    "quantity",
                    "startedAt",
                    "endedAt",
                    "user",
                    "metadata",
                    "rated",
                ],
                "properties": {
                    "quantity": {"type": "number", "exclusiveMinimum": 0},
                    "metadata": {
                        "type": "object",
                        "required": ["eventKey", "jobId", "cluster", "account", "partition"],
                    },
                    "rated": {
                        "type": ["object", "null"],
                        "required": ["unit", "amount", "usd"],
                    },
                },
            },
        },
        "skipped": {"type": "array", "items": {"required": ["jobId", "reason"]}},
        "rejected": {"type": "array", "items": {"required": ["line", "reason"]}},
        "totals": {
            "type": "array",
            "items": {"required": ["allocation", "sku", "quantity", "amount", "usd"]},
        },
    },
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    sacct = tmp_path / "fake-sacct"
    capture = tmp_path / "capture.txt"
    capture.write_bytes(live_capture(ROWS))
    write_fake_sacct(sacct, capture)
    (tmp_path / "config.yaml").write_text(CONFIG.format(base=BASE, sacct=sacct))
    return tmp_path


def run(
    site: Path, *args: str, env: dict[str, str] | None = None, input: bytes | None = None
) -> Result:
    environ = {"PW_API_KEY": "pwt_dGVzdA.secret-value", **(env or {})}
    return cli_runner().invoke(
        main, [*args, "--config", str(site / "config.yaml")], env=environ, input=input
    )


def test_dry_run_table_from_a_saved_file(site: Path) -> None:
    result = run(site, "sync", "--dry-run", "--sacct-file", str(site / "capture.txt"))
    assert result.exit_code == 0, shown(result)
    out = shown(result)
    assert "Dry run" in out and "4 job records: 3 events planned, 2 skipped, 0 rejected" in out
    assert re.search(r"physics-2026\s+SLURM_CPU_HOUR\s+core-hours\s+1\s+4\.000000\s+4\.000000", out)
    assert re.search(
        r"chemistry-2026\s+SLURM_GPU_HOUR\s+GPU-hours\s+1\s+1\.000000\s+2\.500000\s+usd\s+0\.10",
        out,
    )
    assert "account 'unmapped-lab' maps to no allocation" in out
    assert not (site / "state.db").exists()


def test_dry_run_json_document(site: Path) -> None:
    result = run(
        site, "sync", "--dry-run", "--sacct-file", str(site / "capture.txt"), "--output", "json"
    )
    assert result.exit_code == 0, shown(result)
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, DRY_RUN_SCHEMA)
    by_sku = {(e["allocation"], e["sku"]): e for e in doc["events"]}
    gpu = by_sku[("chemistry-2026", "SLURM_GPU_HOUR")]
    assert gpu["quantity"] == 1.0
    assert gpu["rated"] == {"unit": "usd", "amount": 2.5, "usd": 0.1}
    assert gpu["metadata"]["eventKey"] == f"st1:box:12:{T}:0-1800:SLURM_GPU_HOUR"
    assert by_sku[("chemistry-2026", "SLURM_CPU_HOUR")]["quantity"] == 4.0
    assert {s["jobId"] for s in doc["skipped"]} == {"13", "14"}
    assert doc["totals"][0]["allocation"] == "chemistry-2026"


def test_live_dry_run_uses_sacct_and_writes_nothing(site: Path) -> None:
    result = run(site, "sync", "--dry-run", "--now", "2026-03-02T12:00:00Z")
    assert result.exit_code == 0, shown(result)
    assert "window 2026-03-01T11:58:00Z .. 2026-03-02T11:58:00Z" in shown(result)
    assert not (site / "state.db").exists() and not (site / "state.db.lock").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["sync", "--dry-run", "--sacct-file", "/nonexistent"], 2, "cannot read sacct file"),
        (["sync", "--dry-run", "--now", "yesterday"], 2, "not an RFC 3339 time"),
        (["sync", "--output", "xml"], 2, "Invalid value"),
        (["sync", "--now", "2099-01-01T00:00:00Z"], 2, "--now pins the clock for dry runs"),
    ],
)
def test_usage_errors(site: Path, args: list[str], code: int, message: str) -> None:
    result = run(site, *args)
    assert result.exit_code == code
    assert message in shown(result)


def test_bad_config_lists_every_problem(site: Path) -> None:
    (site / "config.yaml").write_text("cluster: box\nreportng_interval: 5m\nsacct: {lag: soon}\n")
    result = run(site, "check")
    assert result.exit_code == 3
    assert "reportng_interval" in shown(result) and "reporting_interval" in shown(result)
    assert "sacct.lag" in shown(result)
    assert "nothing would ever be billed" in shown(result) or "accounts" in shown(result)


def test_failing_sacct_is_temporary_and_changes_nothing(site: Path) -> None:
    broken = site / "fake-sacct"
    broken.write_text("#!/bin/sh\necho 'sacct: error: slurmdbd: connection refused' >&2\nexit 1\n")
    result = run(site, "sync")
    assert result.exit_code == 75
    assert "slurmdbd: connection refused" in shown(result)
    with State.open(site / "state.db", readonly=True) as store:
        assert store.high_water_at() is None and store.to_send() == []


def test_lock_held_exits_75(site: Path) -> None:
    with StateLock(site / "state.db") as lock:
        lock.acquire(datetime.now(timezone.utc))
        result = run(site, "sync")
    assert result.exit_code == 75
    assert "in use by another slurm-tracker" in shown(result)


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with serving(FakeApi()) as fake:
        yield fake


def test_sync_posts_once_then_converges(site: Path, api: FakeApi) -> None:
    first = run(site, "sync", "--output", "json")
    assert first.exit_code == 0, shown(first)
    summary = json.loads(first.stdout)
    assert summary["posted"] == 3 and summary["pending"] == 0 and summary["outcome"] == "ok"
    assert sorted(e["quantity"] for e in api.events) == [1.0, 4.0, 4.0]
    again = run(site, "sync", "--output", "json")
    assert json.loads(again.stdout)["posted"] == 0 and len(api.events) == 3
    dry = run(site, "sync", "--dry-run", "--now", "2026-03-02T12:10:00Z", "--output", "json")
    assert json.loads(dry.stdout)["events"] == []
    status = run(site, "status", "--output", "json")
    info = json.loads(status.stdout)
    assert info["outbox"]["acked"] == 3 and info["lastSync"]["outcome"] == "ok"
    mark = datetime.fromisoformat(info["highWaterMark"].replace("Z", "+00:00"))
    expected = datetime.now(timezone.utc) - timedelta(minutes=2)  # now - sacct.lag
    assert abs((mark - expected).total_seconds()) < 120
    assert "secret-value" not in shown(first) + shown(again) + shown(status)


def test_api_down_keeps_everything_pending_then_delivers(site: Path, api: FakeApi) -> None:
    capture = (site / "capture.txt").read_bytes()
    (site / "capture.txt").write_bytes(live_capture([]))
    assert run(site, "sync").exit_code == 0  # the state file knows the API's record
    (site / "capture.txt").write_bytes(capture)
    api.mode = "down"
    down = run(site, "sync")
    assert down.exit_code == 75, shown(down)
    with State.open(site / "state.db", readonly=True) as store:
        assert len(store.to_send()) == 3
    api.mode = "ok"
    up = run(site, "sync")
    assert up.exit_code == 0, shown(up)
    assert len(api.events) == 3


def test_rejected_event_is_dead_lettered_listed_and_retried(site: Path, api: FakeApi) -> None:
    api.mode = "reject-gpu"
    result = run(site, "sync")
    assert result.exit_code == 4
    assert len(api.events) == 2
    listing = run(site, "outbox", "list", "--status", "dead")
    assert "SLURM_GPU_HOUR" in shown(listing) and "SKU archived" in shown(listing)
    assert run(site, "outbox", "retry").exit_code == 2  # names or --all required
    assert "1 event back to pending" in shown(run(site, "outbox", "retry", "--all"))
    api.mode = "ok"
    assert run(site, "sync").exit_code == 0
    assert len(api.events) == 3


def test_missing_api_key_is_a_config_error(site: Path) -> None:
    result = cli_runner().invoke(
        main, ["sync", "--config", str(site / "config.yaml")], env={"PW_API_KEY": ""}
    )
    assert result.exit_code == 3
    assert "PW_API_KEY" in shown(result)


def test_check_and_catalog_show(site: Path) -> None:
    check = run(site, "check")
    assert check.exit_code == 0 and "valid" in shown(check)
    show = run(site, "catalog", "show", "--at", "2026-03-01T00:00:00Z")
    assert show.exit_code == 0
    assert re.search(r"SLURM_GPU_HOUR\s+usd\s+2\.5\s+0\.04", shown(show))


def test_backfill_dry_run_counts_a_run_seen_by_several_chunks_once(site: Path) -> None:
    # the fake sacct prints the same capture for every chunk, as sacct does for jobs that
    # overlap several windows: each run must still be planned once
    result = run(
        site,
        "backfill",
        "--start",
        "2026-03-01",
        "--end",
        "2026-03-04",
        "--dry-run",
        "--output",
        "json",
    )
    assert result.exit_code == 0, shown(result)
    doc = json.loads(result.stdout)
    assert len(doc["events"]) == 3
    assert {(t["sku"], t["quantity"]) for t in doc["totals"]} == {
        ("SLURM_CPU_HOUR", 4.0),
        ("SLURM_GPU_HOUR", 1.0),
        ("SLURM_CPU_HOUR", 4.0),
    }
    assert not (site / "state.db").exists()


def test_backfill_posts_once_and_leaves_the_high_water_mark(site: Path, api: FakeApi) -> None:
    result = run(
        site,
        "backfill",
        "--start",
        "2026-03-01",
        "--end",
        "2026-03-03",
        "--chunk",
        "12h",
        "--output",
        "json",
    )
    assert result.exit_code == 0, shown(result)
    assert json.loads(result.stdout)["posted"] == 3 and len(api.events) == 3
    with State.open(site / "state.db", readonly=True) as store:
        assert store.high_water_at() is None
    again = run(site, "backfill", "--start", "2026-03-01", "--end", "2026-03-02")
    assert again.exit_code == 0 and len(api.events) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "2026-03-02", "--end", "2026-03-01"], "--end must be after --start"),
        (["--start", "2026-03-01", "--end", "2026-03-02", "--chunk", "soon"], "--chunk"),
    ],
)
def test_backfill_usage_errors(site: Path, args: list[str], message: str) -> None:
    result = run(site, "backfill", *args, "--dry-run")
    assert result.exit_code == 2 and message in shown(result)


def test_check_online_reports_missing_allocations_and_skus(site: Path) -> None:
    org = f"{BASE}/api/organizations/org"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{org}/allocations/physics-2026", json={"name": "physics-2026"})
        mock.get(
            f"{org}/allocations/chemistry-2026",
            status=404,
            json={"error": True, "message": "allocation not found", "code": "not_found"},
        )
        mock.get(f"{org}/units", json=[{"id": "u1", "name": "core-hours"}])
        mock.get(f"{org}/units/core-hours/skus", json=[{"id": "s1", "code": "SLURM_CPU_HOUR"}])
        result = run(site, "check", "--online")
    assert result.exit_code == 3, shown(result)
    assert "allocation 'chemistry-2026'" in shown(result) and "not found" in shown(result)
    assert "SKU 'SLURM_GPU_HOUR' is not among" in shown(result)
    assert "physics-2026" not in shown(result).split("problem", 1)[1].split("\n")[0]


def test_check_warns_about_mapped_skus_missing_from_the_catalog(site: Path) -> None:
    text = (site / "config.yaml").read_text().replace("code: SLURM_GPU_HOUR", "code: OTHER_SKU")
    (site / "config.yaml").write_text(text)
    result = run(site, "check")
    assert result.exit_code == 0
    assert "SKU SLURM_GPU_HOUR is mapped in partitions but missing from the catalog" in shown(
        result
    )


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "slurm_tracker", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("slurm-tracker, version ")


def test_an_unreachable_api_does_not_hold_the_sync(site: Path, api: FakeApi) -> None:
    many = [{**ROWS[0], "JobID": str(1000 + i)} for i in range(40)]
    (site / "capture.txt").write_bytes(live_capture(many))
    api.mode = "down"
    result = run(site, "sync", "--output", "json")
    assert result.exit_code == 75
    assert json.loads(result.stdout)["pending"] == 40
    assert api.posts < 15  # three events fail in a row: the rest waits for the next run


def test_dry_run_after_a_real_sync_shows_only_what_is_new(site: Path, api: FakeApi) -> None:
    running = {**ROWS[0], "End": "Unknown", "ElapsedRaw": "1200", "State": "RUNNING"}
    (site / "capture.txt").write_bytes(live_capture([running]))
    assert run(site, "sync").exit_code == 0
    # the last sacct.lag (2 min) of a running job is held back
    assert [e["metadata"]["elapsedTo"] for e in api.events] == [1080]
    (site / "capture.txt").write_bytes(live_capture([ROWS[0]]))  # it ended at 3600 s
    dry = run(
        site,
        "sync",
        "--dry-run",
        "--sacct-file",
        "-",
        "--output",
        "json",
        input=live_capture([ROWS[0]]),
    )
    events = json.loads(dry.stdout)["events"]
    assert [(e["metadata"]["elapsedFrom"], e["metadata"]["elapsedTo"]) for e in events] == [
        (1080, 3600)
    ]
    assert events[0]["quantity"] == round(4 * 2520 / 3600, 6)
    assert len(api.events) == 1
    assert run(site, "sync").exit_code == 0
    assert [e["metadata"]["elapsedFrom"] for e in api.events] == [0, 1080]


def test_corrupt_state_file_is_exit_3_with_a_hint(site: Path) -> None:
    (site / "state.db").write_bytes(b"not a database" * 200)
    result = run(site, "sync", "--dry-run")
    assert result.exit_code == 3
    assert "restore the latest backup" in shown(result)


def test_one_event_the_api_keeps_failing_on_blocks_no_other(site: Path, api: FakeApi) -> None:
    rows = [{**ROWS[0], "JobID": str(1000 + i)} for i in range(6)]
    (site / "capture.txt").write_bytes(live_capture(rows))
    api.mode = "poison"
    result = run(site, "sync", "--output", "json")
    assert result.exit_code == 4
    summary = json.loads(result.stdout)
    assert (summary["posted"], summary["pending"]) == (5, 1)


def test_dry_run_table_has_a_grand_total_and_verbose_names_account_and_partition(
    site: Path,
) -> None:
    result = run(site, "sync", "--dry-run", "-v", "--sacct-file", str(site / "capture.txt"))
    assert result.exit_code == 0, shown(result)
    out = result.stdout
    assert "total: 3 events; USD 0.100000 (for the 1 events rated in USD)" in out
    assert re.search(r"ACCOUNT\s+PARTITION\s+USER", out)
    assert re.search(r"chemistry-2026\s+SLURM_GPU_HOUR\s+12\s+chemistry\s+gpu\s+alice", out)
