"""The state file in steady state: the time of one cron sync's state work, and its size.

Prints figures; asserts nothing (these machines are shared and noisy). Run:

    python benchmarks/bench_state.py [--known N] [--running N] [--finished N]
                                     [--scale S] [--days D]

1. **One steady-state sync.** A state file is built synthetically (raw inserts, the way the
   agent stores them): ``--known`` runs with progress (1M: ``--running`` of them running, the
   rest final, ended over the pruning horizon of a day and an hour), the acknowledged events of
   the last hour (kept for the ledger check), a month of hourly acknowledged totals. Then the
   state work of one sync is timed, everything but sacct and the network: the ledger check's
   look-up of the keys created since the last check and its bookkeeping, ``reported()`` for the
   runs of the window (running + ``--finished``), the plan's commit (the running runs due for
   their 15-minute bill, the runs that ended, the short runs that came and went), delivery's
   state writes (marked ``sending`` 64 at a time, acknowledged 64 at a time), the prune, the
   counts, the metrics' totals and the sync's record. Target (issue 10): <= 5 s.
2. **A simulated month.** Syncs every 5 minutes for ``--days`` days, at ``--scale`` of the
   steady state (runs, running jobs and accounts all scaled): runs start, run (billed every 15
   minutes), end, and short runs come and go, every event is acknowledged, and each sync
   prunes as the agent does. It prints the file's size (with its -wal) per tracked run (a run
   with progress) at the end. Target (issue 10): <= 300 bytes per tracked run.

Figures are printed as measured / target / ratio.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Optional
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slurm_tracker.events import request_body
from slurm_tracker.models import PlannedEvent, RunKey
from slurm_tracker.pipeline import ACKED_RETENTION_S
from slurm_tracker.state import HOURS_KEPT, OutboxUpdate, State

CLUSTER = "sim"
SKUS = ("SLURM_CPU_HOUR", "SLURM_GPU_HOUR", "SLURM_NODE_HOUR")  # one per partition
STEP_S = 300  # a cron sync every 5 minutes
INTERVAL_S = 900  # a running run is billed every 15 minutes
OVERLAP_S = 3600  # sacct.overlap default: final runs are kept a day and an hour
HORIZON_S = OVERLAP_S + 86400
BATCH = 64  # delivery.MARK_BATCH and ACK_BATCH
SYNC_TARGET_S = 5.0
BYTES_TARGET = 300.0


@dataclass
class Run:
    job: int
    submit: int
    start: int
    account: int
    sku: str
    billed_s: int = 0
    billed_at: int = 0

    @property
    def key(self) -> RunKey:
        return RunKey(CLUSTER, str(self.job), datetime.fromtimestamp(self.submit, timezone.utc))


def _event(run: Run, to_s: int, final: bool, cpus: int = 4) -> PlannedEvent:
    from_s = run.billed_s
    start = datetime.fromtimestamp(run.start + from_s, timezone.utc)
    end = datetime.fromtimestamp(run.start + to_s, timezone.utc)
    key = f"st1:{CLUSTER}:{run.job}:{run.submit}:{from_s}-{to_s}:{run.sku}"
    quantity = (Decimal(cpus * (to_s - from_s)) / 3600).quantize(Decimal("0.000001"))
    return PlannedEvent(
        event_key=key,
        allocation=f"acct-{run.account:03d}",
        sku=run.sku,
        metric="cpu",
        quantity=quantity,
        started_at=start,
        ended_at=end,
        user="alice",
        metadata={
            "eventKey": key,
            "jobId": str(run.job),
            "cluster": CLUSTER,
            "account": f"acct-{run.account:03d}",
            "partition": "compute",
            "agent": "bench@host:0123abcd",
        },
        run=run.key,
        to_s=to_s,
        final=final,
    )


class Cluster:
    """Runs starting, running (billed every INTERVAL_S), ending, and short runs, per sync."""

    def __init__(
        self, running: int, finished: int, short: float, accounts: int, start: int
    ) -> None:
        self.rng = random.Random(10)
        self.accounts = max(1, accounts)
        self.ends = finished / (3600 / STEP_S)  # a window of an hour: 1/12 of them new per sync
        self.short = short
        self.next_job = 1_000_000
        self.last_keys: list[str] = []  # the keys of the last sync's events
        self.running: dict[int, Run] = {}
        self.recent: deque[Run] = deque(maxlen=max(1, finished))  # final runs in the window
        for _ in range(finished):
            run = self._new(start - self.rng.randrange(3600, 4 * 3600))
            run.billed_s = self.rng.randrange(60, 3600)
            run.billed_at = run.start + run.billed_s
            self.recent.append(run)
        for _ in range(running):  # already running, billed at some point of the last interval
            run = self._new(start - self.rng.randrange(3600, 6 * 3600))
            run.billed_s = start - run.start - self.rng.randrange(INTERVAL_S)
            run.billed_at = run.start + run.billed_s
            self.running[run.job] = run

    def _new(self, start: int) -> Run:
        self.next_job += 1
        sku = SKUS[self.rng.randrange(len(SKUS))]
        return Run(self.next_job, start - 60, start, self.rng.randrange(self.accounts), sku)

    def _count(self, mean: float) -> int:
        return int(mean) + (1 if self.rng.random() < mean - int(mean) else 0)

    def step(self, now: int) -> tuple[list[PlannedEvent], list[Run]]:
        """The events a sync at ``now`` plans, and the runs of its window."""
        events: list[PlannedEvent] = []
        window = [*self.running.values(), *self.recent]
        ending = self.rng.sample(
            sorted(self.running), min(len(self.running), self._count(self.ends))
        )
        for job in ending:
            run = self.running.pop(job)
            end = now - self.rng.randrange(STEP_S)
            if end - run.start > run.billed_s:
                events.append(_event(run, end - run.start, final=True))
                run.billed_s, run.billed_at = end - run.start, end
            self.recent.append(run)
            new = self._new(now - self.rng.randrange(STEP_S))
            self.running[new.job] = new
        for run in self.running.values():
            if now - run.billed_at >= INTERVAL_S and now - run.start > run.billed_s:
                events.append(_event(run, now - run.start, final=False))
                run.billed_s, run.billed_at = now - run.start, now
        for _ in range(self._count(self.short)):
            run = self._new(now - STEP_S)
            elapsed = self.rng.randrange(30, STEP_S - 30)
            events.append(_event(run, elapsed, final=True))
            run.billed_s, run.billed_at = elapsed, run.start + elapsed
            window.append(run)
            self.recent.append(run)
        return events, window


def one_sync(
    store: State, cluster: Cluster, now: int, last_keys: Sequence[str]
) -> dict[str, float]:
    """The state work of one sync at ``now``; seconds per part. Returns the parts' times."""
    at = datetime.fromtimestamp(now, timezone.utc)
    times: dict[str, float] = {}
    events, window = cluster.step(now)

    t = time.perf_counter()
    store.known_keys(last_keys)  # ledger.check: the events created since the last check
    store.adopt([], at, checked_at=at)  # nothing unknown: the check is recorded
    times["ledger check"] = time.perf_counter() - t

    t = time.perf_counter()
    store.reported(r.key for r in window)
    times["reported()"] = time.perf_counter() - t

    t = time.perf_counter()
    store.commit_plan(events, [request_body(e) for e in events], at, at - timedelta(seconds=120))
    times["plan commit"] = time.perf_counter() - t

    t = time.perf_counter()
    keys = [e.event_key for e in events]
    for i in range(0, len(keys), BATCH):
        batch = keys[i : i + BATCH]
        store.mark_sending_many(batch, at)
        store.record_outcomes([OutboxUpdate(k, "acked", event_id=str(uuid4())) for k in batch], at)
    times["delivery writes"] = time.perf_counter() - t

    t = time.perf_counter()
    store.prune(at, OVERLAP_S, ACKED_RETENTION_S)
    times["prune"] = time.perf_counter() - t

    t = time.perf_counter()
    store.counts()
    store.outbox(("pending", "sending"), limit=1)
    store.totals_since(at - timedelta(days=1))
    times["counts, status"] = time.perf_counter() - t

    t = time.perf_counter()
    store.posted_totals()
    store.planned_totals()
    store.waiting_by_sku()
    times["metrics totals"] = time.perf_counter() - t

    t = time.perf_counter()
    store.record_sync(at, at, "ok", {"planned": len(events), "posted": len(events)})
    times["record sync"] = time.perf_counter() - t
    times["events"] = len(events)
    times["window runs"] = len(window)
    cluster.last_keys = keys
    return times


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def tracked(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM progress").fetchone()[0])


def build_steady(path: Path, known: int, cluster: Cluster, now: int, accounts: int) -> None:
    """The state file of an agent in steady state, built with raw inserts."""
    State.open(path).close()
    rng = random.Random(3)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    finals = known - len(cluster.running) - len(cluster.recent)
    rows = [(r.key.text, r.billed_s, r.billed_at, 1, r.billed_at) for r in cluster.recent]
    job = 1
    for n in range(finals):  # ended over the horizon, oldest first (as they were billed)
        end = now - HORIZON_S + (HORIZON_S * n) // max(finals, 1)
        rows.append((f"{CLUSTER}:{job + n}:{end - 7200}", 3600, end, 1, end))
    rows += [
        (r.key.text, r.billed_s, r.billed_at, 0, r.billed_at) for r in cluster.running.values()
    ]
    conn.executemany("INSERT INTO progress VALUES (?, ?, ?, ?, ?)", rows)
    # the acknowledged events of the last hour and a sync (the retention after the last check)
    per_sync = int(len(cluster.running) / (INTERVAL_S / STEP_S) + cluster.ends + cluster.short)
    outbox = []
    for s in range(ACKED_RETENTION_S // STEP_S + 1):
        at = now - STEP_S * (s + 1)
        for i in range(per_sync):
            key = f"st1:{CLUSTER}:{2_000_000 + s * per_sync + i}:{at - 4000}:0-{900 + i % 7}:"
            outbox.append(
                (
                    key + SKUS[i % 3],
                    f"acct-{i % accounts:03d}",
                    SKUS[i % 3],
                    "1.000000",
                    at - 900,
                    at,
                    "",
                    "acked",
                    1,
                    0,
                    "",
                    str(uuid4()),
                    at,
                    at,
                )
            )
    conn.executemany(
        "INSERT INTO outbox VALUES (" + ",".join("?" * 14) + ")",
        outbox,
    )
    pairs = [(f"acct-{a:03d}", sku) for a in range(accounts) for sku in SKUS]
    hours = [
        (now // 3600 - h, a, s, rng.randrange(50, 500), "123.456789")
        for h in range(HOURS_KEPT)
        for a, s in pairs
    ]
    conn.executemany("INSERT INTO acked_hours VALUES (?, ?, ?, ?, ?)", hours)
    conn.executemany(
        "INSERT INTO totals VALUES (?, ?, ?, ?, ?)",
        [(k, a, s, 1_000_000, "98765.4321") for k in ("planned", "posted") for a, s in pairs],
    )
    conn.execute(
        "INSERT OR REPLACE INTO meta VALUES ('high_water_at', ?)", (str(now - STEP_S - 120),)
    )
    conn.execute(
        "INSERT OR REPLACE INTO meta VALUES ('ledger_checked_at', ?)", (str(now - STEP_S),)
    )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def row(what: str, measured: float, target: float, unit: str, lower_is_better: bool = True) -> str:
    ratio = measured / target if lower_is_better else target / measured
    return f"{what:<34} {measured:>12,.2f} {target:>10,.2f} {unit:<10} {ratio:>6.2f}"


def steady(args: argparse.Namespace, root: Path) -> list[str]:
    now = int(time.time()) // STEP_S * STEP_S - 86400  # the mark may not pass the real clock
    cluster = Cluster(args.running, args.finished, args.short, args.accounts, now)
    ends = cluster.ends
    path = root / "steady.db"
    t = time.perf_counter()
    build_steady(path, args.known, cluster, now, args.accounts)
    built = time.perf_counter() - t
    with State.open(path) as store:
        first = [
            r[0]
            for r in sqlite3.connect(path).execute(
                "SELECT event_key FROM outbox ORDER BY updated_at DESC LIMIT ?",
                (int(args.running / 3 + ends + args.short),),
            )
        ]
        times = one_sync(store, cluster, now + STEP_S, first)
    work = sum(v for k, v in times.items() if k not in ("events", "window runs"))
    print(
        f"steady state: {args.known:,} runs known ({args.running:,} running), "
        f"{int(times['window runs']):,} runs in the window, {int(times['events']):,} events "
        f"planned and acknowledged (built in {built:.0f} s)"
    )
    for name, seconds in times.items():
        if name not in ("events", "window runs"):
            print(f"  {name:<20} {seconds:8.3f} s")
    size = file_bytes(path) / max(tracked(path), 1)
    return [
        row("steady-state sync, state work", work, SYNC_TARGET_S, "s"),
        row("steady-state file per tracked run", size, BYTES_TARGET, "bytes"),
    ]


def month(args: argparse.Namespace, root: Path) -> list[str]:
    scale = args.scale
    steps = int(args.days * 86400 / STEP_S)
    now = (int(time.time()) - int(args.days * 86400) - 86400) // STEP_S * STEP_S
    accounts = max(1, round(args.accounts * scale))
    cluster = Cluster(
        int(args.running * scale), int(args.finished * scale), args.short * scale, accounts, now
    )
    path = root / "month.db"
    keys: list[str] = []
    slowest = 0.0
    t = time.perf_counter()
    with State.open(path) as store:
        for step in range(steps):
            at = now + STEP_S * (step + 1)
            times = one_sync(store, cluster, at, keys)
            keys = cluster.last_keys
            work = sum(v for k, v in times.items() if k not in ("events", "window runs"))
            slowest = max(slowest, work)
        size = store.size()
    elapsed = time.perf_counter() - t
    runs = tracked(path)
    total = file_bytes(path)
    print(
        f"month: {steps:,} syncs over {args.days:g} days at scale {scale:g} "
        f"({int(args.running * scale):,} running, {accounts} accounts) in {elapsed:.0f} s; "
        f"{runs:,} runs tracked, file {total / 1e6:.1f} MB ({size['free'] / 1e6:.1f} MB free)"
    )
    return [row("month: file per tracked run", total / max(runs, 1), BYTES_TARGET, "bytes")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--known", type=int, default=1_000_000, help="runs with progress")
    parser.add_argument("--running", type=int, default=50_000)
    parser.add_argument("--finished", type=int, default=10_000, help="final runs in the window")
    parser.add_argument("--short", type=float, default=2_500, help="short runs per sync")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--scale", type=float, default=0.01, help="of the month's simulation")
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--skip-month", action="store_true")
    parser.add_argument("--keep", help="build the state files in this directory and keep them")
    args = parser.parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)
        if not args.skip_steady:
            lines += steady(args, root)
        if not args.skip_month:
            lines += month(args, root)
    print(f"{'figure':<34} {'measured':>12} {'target':>10} {'unit':<10} {'ratio':>6}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
