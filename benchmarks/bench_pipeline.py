"""Throughput and memory of the read side: parse + plan of a large sacct capture.

Prints figures; asserts nothing (these machines are shared and noisy). Run:

    python benchmarks/bench_pipeline.py [RECORDS]

It builds sacct output as the live query gets it (a fresh random delimiter; a month of a busy
cluster: RECORDS job runs, a tenth of them still running), then times parse_live (the strict
live reader), parse_sacct (the saved-file reader, on the same records in the capture format)
and plan_usage with the plausibility checks, each also as a ratio to a floor measured in the
same run (a bare ``split`` of every line of the same output), and measures the peak Python
memory of the live read and the plan with tracemalloc.
"""

from __future__ import annotations

import random
import sys
import time
import tracemalloc
from datetime import datetime, timezone
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
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


if __name__ == "__main__":
    main()
