"""Throughput of delivery: the outbox posted to the project's API emulator.

Prints figures; asserts nothing (these machines are shared and noisy). Run:

    python benchmarks/bench_delivery.py [--events N] [--latency MS ...] [--concurrency C ...]
                                        [--server lean|threaded]

For each server latency (default 20 ms and 0 ms) it serves the API emulator (tests/emulator)
in its own process on 127.0.0.1, and for each concurrency (default 4 and 16) it stores N
events in a fresh state file and times ``deliver_outbox`` sending them all. It prints the
events per second, the bound (concurrency / latency: what a pool of that many requests in
flight can reach at best; no bound at 0 ms), the ratio of the two, the state commits per event
(the state file is WAL with ``synchronous=FULL``: every commit is one fsync of the log) and
checks that the emulator holds every event exactly once.

The server: ``lean`` (the default) is the emulator's API (its routes, authentication, contract
validation, rating and storage) behind a lean asyncio front end (benchmarks/lean_emulator.py);
``threaded`` is the emulator's own server (``python -m tests.emulator``), whose thread per
connection and ``http.server`` parsing take about 170 us of CPU per request, on the same two
cores as the client: with it, the figures at 0 ms are the emulator's as much as the client's.

Targets (issue 10): >= 80 % of the bound at 20 ms, >= 2,000 events/s at 0 ms, commits per event
well below 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlite3
import subprocess

from slurm_tracker.api import AllocationsClient
from slurm_tracker.delivery import deliver_outbox
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import PlannedEvent, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import State
from tests.emulator import DEFAULT_API_KEY, DEFAULT_ORGANIZATION, AdminClient, EmulatorProcess
from tests.factories import record

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
CPU = SkuCharge("CPU_HOUR", "cpu")
SECONDS_PER_RUN = 2.0  # aim at about this much sending per (latency, concurrency) pair


class CountingState(State):
    """A state file that counts its write transactions (each one commit, one WAL fsync)."""

    commits = 0

    @contextmanager
    def _tx(self, doing: str = "write to it") -> Iterator[sqlite3.Cursor]:
        with super()._tx(doing) as cur:
            yield cur
        self.commits += 1


@dataclass(frozen=True)
class Figure:
    latency_ms: float
    concurrency: int
    events: int
    seconds: float
    commits: int
    delivered: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    @property
    def bound(self) -> Optional[float]:
        return self.concurrency / (self.latency_ms / 1000) if self.latency_ms > 0 else None


def events(n: int) -> list[PlannedEvent]:
    out: list[PlannedEvent] = []
    for i in range(n):
        rec = record(job_id=str(100000 + i), elapsed_s=3600, start_at=T0 + timedelta(seconds=i))
        out.extend(plan(split(rec, 0, 3600), "physics", [CPU]))
    return out


class LeanEmulatorProcess:
    """benchmarks/lean_emulator.py in a child process (what EmulatorProcess is to the
    emulator's own server): ``base_url`` and ``admin`` while inside."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.base_url = ""
        self.process: Optional[subprocess.Popen[str]] = None

    def __enter__(self) -> LeanEmulatorProcess:
        script = Path(__file__).resolve().parent / "lean_emulator.py"
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--latency", repr(float(self.latency_s))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("http"):
            self.__exit__()
            raise SystemExit(f"the lean emulator did not start: first line {line!r}")
        self.base_url = line.strip()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.base_url)


def serving(server: str, latency_s: float) -> AbstractContextManager[Any]:
    """The emulator, served by ``server`` (lean or threaded), in its own process."""
    if server == "lean":
        return LeanEmulatorProcess(latency_s)
    return EmulatorProcess(latency_s=latency_s)


def run_one(base_url: str, latency_ms: float, concurrency: int, n: int, work: Path) -> Figure:
    path = work / f"state-{latency_ms:g}-{concurrency}.db"
    planned = events(n)
    store = CountingState.open(path)
    assert isinstance(store, CountingState)
    try:
        store.commit_plan(planned, [request_body(e) for e in planned], T0, None)
        client = AllocationsClient(base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY)
        store.commits = 0
        started = time.perf_counter()
        report = deliver_outbox(store, client, lambda: datetime.now(timezone.utc), concurrency)
        seconds = time.perf_counter() - started
        commits = store.commits
        left = store.counts()
    finally:
        store.close()
    if report.acked != n or left.get("acked") != n:
        raise SystemExit(f"not every event was delivered: {report} {left}")
    return Figure(latency_ms, concurrency, n, seconds, commits, report.acked)


def bench(
    latencies_ms: Sequence[float],
    concurrencies: Sequence[int],
    n: Optional[int],
    server: str = "lean",
) -> list[Figure]:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for latency_ms in latencies_ms:
            with serving(server, latency_ms / 1000) as emulator:
                admin = emulator.admin
                for concurrency in concurrencies:
                    admin.reset()
                    if n is not None:
                        count = n
                    elif latency_ms > 0:
                        count = int(SECONDS_PER_RUN * concurrency / (latency_ms / 1000))
                    else:
                        count = int(SECONDS_PER_RUN * 2000)
                    figure = run_one(emulator.base_url, latency_ms, concurrency, count, work)
                    stored = [e.event_key for e in admin.events()]
                    if len(stored) != count or len(set(stored)) != count:
                        raise SystemExit(
                            f"the emulator holds {len(stored)} events ({len(set(stored))} "
                            f"keys), {count} were sent"
                        )
                    figures.append(figure)
                    show(figure, server)
    return figures


def show(f: Figure, server: str) -> None:
    bound = f"{f.bound:8.0f}" if f.bound is not None else "       -"
    ratio = f"{f.rate / f.bound:6.0%}" if f.bound is not None else "     -"
    target = "80% of bound" if f.bound is not None else ">= 2000 ev/s"
    print(
        f"{f.latency_ms:7g} {f.concurrency:5d} {f.events:7d} {f.seconds:8.2f} {f.rate:9.0f} "
        f"{bound} {ratio} {f.commits / f.events:14.3f}   {target:12s}  {server}",
        flush=True,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, help="events per run (default: ~2 s of sending)")
    parser.add_argument("--latency", type=float, nargs="+", default=[20.0, 0.0], help="ms")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--server",
        choices=["lean", "threaded"],
        default="lean",
        help="the emulator behind a lean asyncio front end, or its own threaded server",
    )
    args = parser.parse_args(argv)
    print(
        "latency  conc  events  seconds  events/s    bound  ratio  commits/event   "
        "target        server"
    )
    bench(args.latency, args.concurrency, args.events, args.server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
