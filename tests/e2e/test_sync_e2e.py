"""slurm-tracker against the real Slurm box and the API emulator: what it bills equals what
Slurm measured (count x ElapsedRaw / 3600 per run, from an independent final sacct), exactly
once, with syncs while jobs run and a sync killed with SIGKILL in the middle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests.e2e import cluster
from tests.emulator import DEFAULT_API_KEY, Emulator

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
cluster: box
state_file: {state}
reporting_interval: 2s
api: {{organization: test-org, url: "{url}", max_attempts: 3, max_retry_time: 20s}}
sacct: {{lag: 1s, overlap: 1h, first_sync_start: 2h, timeout: 60s}}
accounts: {{map: {{physics: physics, chemistry: chemistry}}}}
partitions:
  map:
    compute: CPU_HOUR
    gpu: [{{sku: GPU_HOUR, metric: gpu}}, {{sku: CPU_HOUR, metric: cpu}}]
"""


def agent(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PW_API_KEY": DEFAULT_API_KEY, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "slurm_tracker", "sync", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def sync(config: Path) -> int:
    proc = agent(config)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 4), (proc.returncode, out, err)
    return proc.returncode


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_mixed_workload_is_billed_exactly_once(tmp_path: Path) -> None:
    with Emulator() as emulator:
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(state=tmp_path / "state.db", url=emulator.base_url))
        jobs = {
            "long": cluster.submit("-c", "2", account="physics", wrap="sleep 12"),
            "gpu": cluster.submit(
                "--gres=gpu:2", account="chemistry", partition="gpu", wrap="sleep 8"
            ),
            "failed": cluster.submit(account="chemistry", wrap="sleep 1; exit 1"),
            "unmapped": cluster.submit(account="unmapped-lab", wrap="sleep 2"),
            "pending": cluster.submit("--begin=now+1hour", account="physics", wrap="true"),
        }
        cluster.wait_state(jobs["long"], ["RUNNING"], timeout=60)
        # incremental syncs while jobs run, one of them killed mid-flight
        for round_ in range(4):
            time.sleep(3)
            if round_ == 1:
                proc = agent(config)
                time.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
            else:
                sync(config)
        cluster.cancel(jobs["pending"])
        cluster.wait_all_done(jobs.values(), timeout=180)
        time.sleep(2)  # the lag
        assert sync(config) == 0
        assert sync(config) == 0  # converged: nothing new
        truth = cluster.truth(jobs.values())
        accepted: dict[tuple[str, str, int, str], Decimal] = defaultdict(Decimal)
        keys = [e.event_key for e in emulator.events()]
        assert len(keys) == len(set(keys)), "an event key was accepted twice"
        for event in emulator.events():
            meta = event.metadata
            submitted = datetime.fromisoformat(meta["submittedAt"].replace("Z", "+00:00"))
            run = (meta["cluster"], meta["jobIdRaw"], int(submitted.timestamp()), event.sku)
            accepted[run] += event.quantity
        checked = 0
        for (cluster_name, raw, submit), run in truth.items():
            expected = {"CPU_HOUR": Decimal(run.cpu) * run.elapsed_s / 3600}
            if run.partition == "gpu":
                expected["GPU_HOUR"] = Decimal(run.gpu) * run.elapsed_s / 3600
            for sku, want in expected.items():
                got = accepted.get((cluster_name, raw, submit, sku), Decimal(0))
                if run.account == "unmapped-lab" or run.elapsed_s == 0:
                    assert got == 0, (run, sku)
                else:
                    assert abs(got - want) <= Decimal("0.00001"), (run, sku, got, want)
                    checked += 1
        assert checked == 4  # long, failed, and the GPU job's two SKUs
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "slurm_tracker",
                "status",
                "--config",
                str(config),
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
        )
        info = json.loads(check.stdout)
        assert info["outbox"]["pending"] == 0 and info["outbox"]["dead"] == 0
