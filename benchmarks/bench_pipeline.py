"""Throughput and memory of the read side: `sync --dry-run --sacct-file` on a large capture.

Prints figures; asserts nothing (these machines are shared and noisy). Run:

    python benchmarks/bench_pipeline.py [ROWS ...] [--output table json] [--stages]

For each ROWS (default 100000) it writes a synthetic saved capture as `sacct --parsable2`
writes it (a header, ``|`` between fields, naive ISO times; 200 accounts of which 190 are
mapped, 3 partitions, a tenth of the runs still running, a month of a busy cluster with a rate
change of the GPU SKU in the window: about 1.9 events per row), then runs the real CLI
(``python -m slurm_tracker sync --dry-run --sacct-file FILE --output table|json``) in a
subprocess, measuring its wall time and its peak RSS (``wait4``), and a floor in the same run:
a bare Python pass reading the same file and splitting every line at ``|``. It prints rows/s,
peak RSS, and the ratio to the floor next to the targets of issue 10 (>= 100k rows/s, <= 3x
the floor, <= 200 MB peak RSS, flat in ROWS), then a second reference (``skel.``): the least
any Python planner must do per row (``skeleton_pass``), which alone is ~12-17x the floor.

``--stages`` also times the stages in this process on the live format (parse_live, the saved
reader, plan_usage), as ratios to the floor, with tracemalloc's peak.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slurm_tracker import pipeline
from slurm_tracker.config import Config, load_config
from slurm_tracker.parse import parse_live, parse_sacct
from slurm_tracker.rating import Catalog
from slurm_tracker.sacct import CAPTURE_DELIMITER, LIVE_FIELDS, new_delimiter
from tests.factories import live_capture

REPO = Path(__file__).resolve().parent.parent
T0 = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())

#: The synthetic month: 2026-06-10 .. 2026-07-10, the GPU rate changing on 2026-06-25, a month
#: boundary on 2026-07-01; the dry run's clock just after it.
MONTH_AT = datetime(2026, 6, 10, tzinfo=timezone.utc)
NOW = "2026-07-12T00:00:00Z"
ACCOUNTS = 200
MAPPED = 190
FIELDS = (
    "JobID", "JobIDRaw", "Cluster", "Account", "Partition", "User", "QOS", "Submit", "Start",
    "End", "ElapsedRaw", "State", "AllocTRES", "NNodes", "JobName",
)  # fmt: skip

TARGET_ROWS_S = 100_000
TARGET_RATIO = 3.0
TARGET_RSS_MB = 200


def config_text(state: Path) -> str:
    """A config billing the synthetic cluster: 190 of its 200 accounts mapped, 3 partitions
    (one of them two SKUs), and an inline catalog whose GPU rate changes inside the month."""
    accounts = "\n".join(f"    acct{i:03d}: alloc-{i % 50:02d}" for i in range(MAPPED))
    return f"""\
cluster: synth
state_file: {state}
reporting_interval: 15m
api:
  organization: bench
sacct:
  lag: 2m
  overlap: 1h
accounts:
  map:
{accounts}
partitions:
  map:
    compute: SLURM_CPU_HOUR
    gpu:
      - {{sku: SLURM_GPU_HOUR, metric: gpu}}
      - {{sku: SLURM_CPU_HOUR, metric: cpu}}
    bigmem: {{sku: SLURM_MEM_HOUR, metric: mem}}
metadata:
  fields: [qos]
catalog:
  units:
    - name: core-hours
      ratedInUsd: false
      skus:
        - code: SLURM_CPU_HOUR
          rules: [{{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 1}}]
        - code: SLURM_MEM_HOUR
          rules: [{{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 0.25}}]
    - name: usd
      ratedInUsd: true
      rules: [{{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 1}}]
      skus:
        - code: SLURM_GPU_HOUR
          rules:
            - effectiveFrom: "2026-01-01T00:00:00Z"
              effectiveTo: "2026-06-25T00:00:00Z"
              rate: 2.5
            - {{effectiveFrom: "2026-06-25T00:00:00Z", effectiveTo: null, rate: 2.0}}
"""


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S")


def write_capture(path: Path, rows: int, seed: int = 42) -> None:
    """``rows`` allocation records of a month, as `sacct --parsable2` prints them."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.write("|".join(FIELDS) + "\n")
        for i in range(rows):
            submit = MONTH_AT + timedelta(seconds=rng.randrange(0, 30 * 86400))
            start = submit + timedelta(seconds=rng.randrange(0, 600))
            elapsed = rng.randrange(60, 2 * 86400)
            running = rng.random() < 0.1
            partition = rng.choice(("compute", "gpu", "gpu", "bigmem"))
            cpus = rng.choice((1, 4, 8, 16, 32))
            tres = f"billing={cpus},cpu={cpus},mem={cpus * 4}G,node=1"
            if partition == "gpu":
                gpus = rng.choice((1, 2, 4))
                tres += f",gres/gpu:a100={gpus},gres/gpu={gpus}"
            job = str(1_000_000 + i)
            out.write(
                "|".join(
                    (
                        job,
                        job,
                        "synth",
                        f"acct{rng.randrange(ACCOUNTS):03d}",
                        partition,
                        f"user{rng.randrange(500):03d}",
                        "normal",
                        _iso(submit),
                        _iso(start),
                        "Unknown" if running else _iso(start + timedelta(seconds=elapsed)),
                        str(elapsed),
                        "RUNNING" if running else "COMPLETED",
                        tres,
                        "1",
                        f"job-{i % 997}",
                    )
                )
                + "\n"
            )


def floor_pass(path: Path) -> tuple[float, int]:
    """The floor: a bare Python pass reading the file and splitting every line at ``|`` (the
    best of three, the file in the page cache as for the agent)."""
    best = float("inf")
    rows = 0
    for _ in range(3):
        t0 = time.perf_counter()
        rows = 0
        with path.open("r", encoding="utf-8") as f:
            for line in f:
                rows += len(line.split("|")) > 1
        best = min(best, time.perf_counter() - t0)
    return best, rows


def skeleton_pass(path: Path) -> float:
    """A second reference: the least any Python planner must do per row (split it, read its
    three times with the C parser, its TRES, one Decimal quantity rounded half-even, an event
    key and a running total), with none of the agent's checks, mapping, month and rate cuts,
    rating, metadata or output. The best of three. It shows what the "<= 3x the split pass"
    target asks of CPython: this skeleton alone is far above it."""
    quantum, hour = Decimal("0.000001"), Decimal(3600)
    utc = timezone.utc
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        totals: dict[tuple[str, str, str], Decimal] = {}
        with path.open("r", encoding="utf-8") as f:
            next(f)
            for line in f:
                v = line.rstrip("\n").split("|")
                submit = datetime.fromisoformat(v[7]).replace(tzinfo=utc)
                datetime.fromisoformat(v[8]).replace(tzinfo=utc)
                if v[9] != "Unknown":
                    datetime.fromisoformat(v[9]).replace(tzinfo=utc)
                elapsed = int(v[10])
                tres = dict(item.split("=", 1) for item in v[12].split(","))
                amount = (Decimal(int(tres["cpu"])) * elapsed / hour).quantize(
                    quantum, rounding=ROUND_HALF_EVEN
                )
                key = f"st1:{v[2]}:{v[1]}:{int(submit.timestamp())}:0-{elapsed}:CPU"
                group = (v[3], v[4], key[-3:])  # account, partition, SKU
                totals[group] = totals.get(group, Decimal(0)) + amount
        best = min(best, time.perf_counter() - t0)
    return best


def run_cli(config: Path, capture: Path, output: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, bytes printed) of one dry run through the real CLI."""
    with tempfile.TemporaryFile() as sink:
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slurm_tracker",
                "sync",
                "--config",
                str(config),
                "--dry-run",
                "--sacct-file",
                str(capture),
                "--now",
                NOW,
                "--output",
                output,
            ],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        errors = child.stderr.read().decode() if child.stderr else ""
        if child.stderr:
            child.stderr.close()
        if child.returncode != 0:
            raise SystemExit(f"the dry run failed (exit {child.returncode}): {errors[-2000:]}")
        size = sink.seek(0, os.SEEK_END)
    return seconds, usage.ru_maxrss / 1024, size  # ru_maxrss: KiB on Linux


def cli_table(sizes: list[int], outputs: list[str]) -> None:
    print(
        f"{'rows':>9} {'output':>6} {'agent s':>8} {'rows/s':>9} {'peak RSS':>9} "
        f"{'floor s':>8} {'x floor':>8} {'out MB':>7}   targets: >= {TARGET_ROWS_S:,} rows/s, "
        f"<= {TARGET_RATIO:g}x floor, <= {TARGET_RSS_MB} MB"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(config_text(Path(tmp) / "state.db"), encoding="utf-8")
        for rows in sizes:
            capture = Path(tmp) / f"capture-{rows}.txt"
            write_capture(capture, rows)
            skeleton_s = 0.0
            for output in outputs:
                floor_s, _ = floor_pass(capture)
                seconds, rss, size = run_cli(config, capture, output)
                print(
                    f"{rows:>9,} {output:>6} {seconds:>8.2f} {rows / seconds:>9,.0f} "
                    f"{rss:>6.0f} MB {floor_s:>8.3f} {seconds / floor_s:>7.1f}x "
                    f"{size / 1e6:>7.1f}",
                    flush=True,
                )
                skeleton_s = skeleton_s or skeleton_pass(capture)
            print(
                f"{'':>9} {'skel.':>6} {skeleton_s:>8.2f} {rows / skeleton_s:>9,.0f} "
                f"{'':>9} {'':>8} {skeleton_s / floor_s:>7.1f}x   (skeleton_pass: split, "
                "times, TRES, one quantity per row, nothing else)",
                flush=True,
            )
            capture.unlink()


# --- the stages in this process (--stages) --------------------------------------------------


def capture(n: int) -> bytes:
    rng = random.Random(42)
    rows = []
    for i in range(n):
        start = T0 + rng.randrange(0, 30 * 86400)
        elapsed = rng.randrange(1, 2 * 86400)
        running = rng.random() < 0.1
        gpu = rng.choice([0, 0, 0, 1, 4])
        rows.append(
            {
                "JobID": str(100000 + i),
                "Account": rng.choice(["physics", "chemistry", "unmapped-lab"]),
                "Partition": "gpu" if gpu else "compute",
                "Submit": str(start - 60),
                "Start": str(start),
                "End": "Unknown" if running else str(start + elapsed),
                "ElapsedRaw": str(elapsed),
                "State": "RUNNING" if running else "COMPLETED",
                "AllocTRES": "billing=8,cpu=8,mem=32G,node=1" + (f",gres/gpu={gpu}" if gpu else ""),
            }
        )
    return live_capture(rows)


def run(
    live: bytes, delimiter: str, config: Config, catalog: Optional[Catalog]
) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    parsed = parse_live(live, delimiter=delimiter, fields=LIVE_FIELDS, cluster="box", source="")
    t1 = time.perf_counter()
    plan = pipeline.plan_usage(parsed, {}, config, catalog, now_at=pipeline.utc_now())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(plan.events)


def stages(n: int) -> None:
    data = capture(n)
    delimiter = new_delimiter()
    live = data.replace(CAPTURE_DELIMITER.encode(), delimiter.encode())
    config = load_config(REPO / "config.example.yaml")
    catalog = pipeline.load_catalog(config)
    t0 = time.perf_counter()
    floor_rows = sum(len(line.split(delimiter)) > 1 for line in live.decode().split("\n"))
    floor_s = time.perf_counter() - t0  # the floor: a bare split pass over the same output
    t0 = time.perf_counter()
    parse_sacct(data, cluster="box")
    saved_s = time.perf_counter() - t0
    parse_s, plan_s, events = run(live, delimiter, config, catalog)
    tracemalloc.start()  # a second pass for memory: tracemalloc slows Python down a lot
    run(live, delimiter, config, catalog)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"records          {n:>12,}")
    print(f"input size       {len(data) / 1e6:>12.1f} MB")
    print(f"floor (split)    {floor_s:>12.2f} s  {floor_rows / floor_s:>10,.0f} rows/s")
    print(
        f"parse (live)     {parse_s:>12.2f} s  {n / parse_s:>10,.0f} records/s"
        f"  {parse_s / floor_s:>6.1f}x floor"
    )
    print(
        f"parse (saved)    {saved_s:>12.2f} s  {n / saved_s:>10,.0f} records/s"
        f"  {saved_s / floor_s:>6.1f}x floor"
    )
    print(
        f"plan             {plan_s:>12.2f} s  {n / plan_s:>10,.0f} records/s"
        f"  {plan_s / floor_s:>6.1f}x floor  (map+check+segment+rate)"
    )
    print(f"events planned   {events:>12,}")
    print(f"peak memory      {peak / 2**20:>12.1f} MiB {peak / n:>10,.0f} bytes/record")
    print(f"memory / input   {peak / len(data):>12.1f} x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", type=int, default=[100_000], help="rows per capture")
    parser.add_argument(
        "--output", nargs="+", default=["table", "json"], choices=["table", "json", "csv"]
    )
    parser.add_argument("--stages", action="store_true", help="also time the stages in-process")
    args = parser.parse_args()
    cli_table(args.rows, args.output)
    if args.stages:
        print()
        stages(args.rows[0])


if __name__ == "__main__":
    main()
