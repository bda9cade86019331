"""`slurm-tracker report` on the real box: utilisation from the steps slurmdbd recorded.

Two short jobs (< 30 s each, run side by side):

* one allocates 4 cores and keeps ONE busy: its CPU utilisation must be about 25%, and exactly
  what the job measured of itself (its own CPU time, written to a file) over 4 x ElapsedRaw;
* one holds 200 MiB (a Python bytearray, every page touched) for longer than the box's
  accounting sample period (JobAcctGatherFrequency=task=5, tests/e2e/box/start.sh): its peak
  memory must be 200 MiB plus the interpreter, within the sampling accuracy.

Both: the report's core-hours equal the billing truth (AllocTRES cpu x ElapsedRaw from
cluster.truth, independent of slurm_tracker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import cluster

REPO = Path(__file__).resolve().parents[2]
BUSY_S = 20
HOLD_S = 14
HOLD_MIB = 200
RSS_SLACK_MIB = 60  # the interpreter, the shell of the batch script, page tables

CONFIG = """\
cluster: box
state_file: {state}
sacct: {{timeout: 60s, backfill_pause: 0s}}
accounts: {{map: {{physics: physics, chemistry: chemistry}}}}
partitions: {{map: {{compute: CPU_HOUR, gpu: GPU_HOUR}}}}
pricing:
  currency: EUR
  partitions: {{compute: {{cpu_hour: 0.5, mem_gb_hour: 0.25}}, gpu: {{gpu_hour: 2}}}}
"""

BUSY = """\
import sys, time
end = time.time() + {seconds}
while time.time() < end:
    pass
with open(sys.argv[1], "w") as out:
    out.write(repr(time.process_time()))
"""

HOLD = """\
import time
block = bytearray({mib} * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep({seconds})
print(len(block))
"""


def _script(text: str, tag: str) -> Path:
    path = Path(cluster.JOBS_DIR) / f"report-e2e-{tag}-{uuid.uuid4().hex[:8]}.py"
    path.write_text(text)
    path.chmod(0o644)
    return path


def _report(tmp_path: Path, start_at: datetime, *args: str) -> Any:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(state=tmp_path / "state.db"))
    env = {k: v for k, v in os.environ.items() if k != "SLURM_TRACKER_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    argv = [
        sys.executable, "-m", "slurm_tracker", "report", "--config", str(config),
        "--start", start_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "--by", "job", "--top", "100",
        *args,
    ]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_utilisation_and_core_hours_on_the_box(tmp_path: Path) -> None:
    started_at = datetime.now(timezone.utc) - timedelta(seconds=5)
    measured = Path(cluster.JOBS_DIR) / f"report-e2e-cpu-{uuid.uuid4().hex[:8]}.txt"
    busy = _script(BUSY.format(seconds=BUSY_S), "busy")
    hold = _script(HOLD.format(mib=HOLD_MIB, seconds=HOLD_S), "hold")
    cpu_job = cluster.submit(
        "-c", "4", "--mem=400M", "--time=2",
        account="physics", wrap=f"python3 {busy} {measured}",
    )  # fmt: skip
    mem_job = cluster.submit(
        "-c", "1", "--mem=1G", "--time=2", account="chemistry", wrap=f"python3 {hold}"
    )
    try:
        cluster.wait_all_done([cpu_job, mem_job], timeout=240)
        time.sleep(2)  # step records reach slurmdbd with (or just after) the job's end
        truth = {run.job_id: run for run in cluster.truth([cpu_job, mem_job]).values()}
        done = _report(tmp_path, started_at, "--output", "json")
        data = json.loads(done.stdout)
        rows = {row["group"]: row for row in data["rows"]}
        assert {cpu_job, mem_job} <= set(rows), done.stdout
        assert data["rejected"] == 0

        # core-hours = the billing truth, exactly (within the 6-decimal JSON rounding)
        for job_id in (cpu_job, mem_job):
            run = truth[job_id]
            assert rows[job_id]["cpuHours"] == pytest.approx(
                run.cpu * run.elapsed_s / 3600, abs=2e-6
            )
            assert rows[job_id]["runs"] == 1

        # ~25% CPU: one busy core of four, exactly what the job measured of itself
        cpu = rows[cpu_job]
        own_cpu_s = float(measured.read_text())
        expected = own_cpu_s / (4 * truth[cpu_job].elapsed_s)
        print(
            f"\nCPU job {cpu_job}: elapsed {truth[cpu_job].elapsed_s} s, own CPU "
            f"{own_cpu_s:.2f} s, expected utilisation {expected:.3f}, report "
            f"{cpu['cpuUtilization']:.3f}"
        )
        assert cpu["cpuUtilization"] == pytest.approx(expected, abs=0.02)
        assert 0.12 <= cpu["cpuUtilization"] <= 0.27

        # 200 MiB held for longer than the sample period: seen, within the sampling accuracy
        mem = rows[mem_job]
        peak_mib = mem["memUsedGBHours"] / mem["wallHours"] * 1024
        print(f"memory job {mem_job}: peak {peak_mib:.1f} MiB (held {HOLD_MIB} MiB)")
        assert HOLD_MIB <= peak_mib <= HOLD_MIB + RSS_SLACK_MIB
        assert mem["memGBHours"] == pytest.approx(mem["wallHours"], abs=2e-6)  # asked 1 GiB
        assert mem["memUtilization"] == pytest.approx(peak_mib / 1024, abs=1e-3)

        # the other outputs of the same period read the same jobs
        html = _report(tmp_path, started_at, "--output", "html").stdout
        assert f'data-series="{cpu_job}"' in html and "<script" not in html
        table = _report(tmp_path, started_at).stdout
        assert cpu_job in table
    finally:
        for job_id in (cpu_job, mem_job):
            cluster.run("scancel", job_id, check=False)
        for path in (busy, hold, measured):
            path.unlink(missing_ok=True)
