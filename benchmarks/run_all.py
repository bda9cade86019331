"""Every benchmark of issue 10 with one command: the pipeline (parse -> plan -> output, against
the bare split pass), delivery (against the emulator with latency) and the state file (steady
state and a simulated month). Each prints its own table: measured, target, ratio.

    python benchmarks/run_all.py            # the issue's sizes (about 15 minutes)
    python benchmarks/run_all.py --quick    # small sizes (a minute): the shape, not the figures
    python benchmarks/run_all.py --list     # the commands it would run

Prints figures; asserts nothing (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

FULL = [
    ["bench_pipeline.py", "1000000", "--output", "table", "json"],
    ["bench_delivery.py"],
    ["bench_state.py"],
]
QUICK = [
    ["bench_pipeline.py", "20000", "--output", "table", "json"],
    ["bench_delivery.py", "--events", "200"],
    ["bench_state.py", "--known", "20000", "--running", "1000", "--finished", "500", "--days", "1"],
]


def commands(quick: bool) -> list[list[str]]:
    return [
        [sys.executable, str(HERE / script), *args] for script, *args in (QUICK if quick else FULL)
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--list", action="store_true", help="print the commands and stop")
    args = parser.parse_args(argv)
    status = 0
    for command in commands(args.quick):
        shown = " ".join(Path(c).name if c.endswith(".py") else c for c in command[1:])
        if args.list:
            print(shown)
            continue
        print(f"\n=== {shown}", flush=True)
        started = time.monotonic()
        done = subprocess.run(command, check=False)
        print(f"=== exit {done.returncode} after {time.monotonic() - started:.0f} s", flush=True)
        status = status or done.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
