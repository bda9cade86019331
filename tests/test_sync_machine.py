"""The sync loop as a state machine: jobs start, run, end and are requeued; syncs run at
random times; the process dies at chosen points; the API fails in every way it can.

After every step, against a fake API that records what it accepted: no event key was accepted
twice, and no run was billed more than Slurm measured. Once the faults stop and the jobs end,
a few clean syncs bill every run exactly (DESIGN.md invariants 1, 2, 4 and 5).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import responses
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from slurm_tracker import pipeline
from slurm_tracker.api import AllocationsClient
from slurm_tracker.config import config_from_text
from slurm_tracker.state import OutboxUpdate, State
from tests.factories import live_capture
from tests.fake_api import BASE, USAGE, FakeApi

T0 = datetime(2026, 1, 31, 20, 0, tzinfo=timezone.utc)  # a month boundary comes soon
CONFIG = """
cluster: box
reporting_interval: 1m
api: {organization: org}
accounts: {map: {physics: physics-2026, chemistry: chemistry-2026}}
partitions:
  map:
    compute: SLURM_CPU_HOUR
    gpu: [{sku: SLURM_GPU_HOUR, metric: gpu}, {sku: SLURM_CPU_HOUR, metric: cpu}]
"""
FAULTS = [
    "ok",
    "ok",
    "ok",
    "503",
    "commit+503",
    "commit+timeout",
    "commit+reset",
    "refused",
    "429",
    "400",
]
CRASHES = [None, None, "after-commit", "before-post", "after-post", "after-ack"]


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the agent may catch it)."""


@dataclass
class Run:
    job_id: int
    submit_s: int
    start_s: Optional[int]
    account: str
    partition: str
    cpu: int
    gpu: int
    elapsed_s: int = 0
    final: bool = False
    ended_s: int = 0  # when the run ended (model clock)
    end_known_s: int = 0  # when slurmdbd learns of the end: until then sacct shows it running

    @property
    def key(self) -> str:
        return f"box:{self.job_id}:{int((T0 + timedelta(seconds=self.submit_s)).timestamp())}"

    def row(self, now_s: int) -> dict[str, str]:
        """This run as sacct shows it at ``now_s`` (seconds after T0)."""
        epoch = int(T0.timestamp())
        started = self.start_s is not None and self.start_s <= now_s
        if self.final and now_s < self.end_known_s:
            # slurmdbd is behind: the run looks alive, its ElapsedRaw growing with the clock
            behind = {
                "End": "Unknown",
                "State": "RUNNING",
                "ElapsedRaw": str(self.elapsed_s + now_s - self.ended_s),
            }
            return {**Run.row(replace(self, final=False), now_s), **behind}
        tres = f"billing={self.cpu},cpu={self.cpu},mem=1G,node=1" + (
            f",gres/gpu={self.gpu}" if self.gpu else ""
        )
        return {
            "JobID": str(self.job_id),
            "Account": self.account,
            "Partition": self.partition,
            "Submit": str(epoch + self.submit_s),
            "Start": str(epoch + (self.start_s or 0)) if started else "Unknown",
            "End": str(epoch + (self.start_s or 0) + self.elapsed_s) if self.final else "Unknown",
            "ElapsedRaw": str(self.elapsed_s if started else 0),
            "State": "COMPLETED" if self.final else ("RUNNING" if started else "PENDING"),
            "AllocTRES": tres if started else "",
        }

    def truth(self, metric: str) -> Decimal:
        return Decimal(self.cpu if metric == "cpu" else self.gpu) * self.elapsed_s / 3600


class CrashingState(State):
    """A state file whose process dies at one chosen point of the next sync."""

    crash_at: Optional[str] = None

    def _maybe(self, point: str) -> None:
        if self.crash_at == point:
            self.crash_at = None
            raise Crash(point)

    def commit_plan(self, *args: Any, **kwargs: Any) -> int:
        added = super().commit_plan(*args, **kwargs)
        self._maybe("after-commit")
        return added

    def mark_sending_many(self, keys: Sequence[str], now_at: datetime) -> None:
        super().mark_sending_many(keys, now_at)
        self._maybe("before-post")  # a batch is marked sending, none of it posted

    def record_outcomes(self, updates: Sequence[OutboxUpdate], now_at: datetime) -> None:
        self._maybe("after-post")  # the API has them (acked ones), our state does not know yet
        super().record_outcomes(updates, now_at)
        self._maybe("after-ack")


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="st-machine-"))
        self.config = config_from_text(CONFIG, "test-config")
        self.api = FakeApi()
        self.runs: list[Run] = []
        self.now_s = 0
        self.next_id = 100
        self.mock = responses.RequestsMock(assert_all_requests_are_fired=False)
        self.mock.start()
        self.mock.add_callback(responses.POST, USAGE, callback=self.api.post)
        self.mock.add_callback(responses.GET, USAGE, callback=self.api.list_usage)

    def teardown(self) -> None:
        self.mock.stop()
        self.mock.reset()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ the cluster
    @initialize()
    def first_job(self) -> None:
        self.submit("physics", "compute", 2, 0)

    def submit(self, account: str, partition: str, cpu: int, gpu: int, delay: int = 0) -> None:
        self.next_id += 1
        self.runs.append(
            Run(self.next_id, self.now_s, self.now_s + delay, account, partition, cpu, gpu)
        )

    @rule(
        account=st.sampled_from(["physics", "chemistry", "unmapped-lab"]),
        partition=st.sampled_from(["compute", "gpu"]),
        cpu=st.integers(1, 64),
        gpu=st.integers(0, 4),
        delay=st.sampled_from([0, 0, 300, 5000]),
    )
    @precondition(lambda self: len(self.runs) < 12)
    def start_job(self, account: str, partition: str, cpu: int, gpu: int, delay: int) -> None:
        self.submit(account, partition, cpu, 0 if partition == "compute" else gpu, delay)

    @rule(
        seconds=st.sampled_from([30, 45, 599, 601, 3600, 86400, 20 * 86400]),
        suspended=st.booleans(),
    )
    def time_passes(self, seconds: int, suspended: bool) -> None:
        self.now_s += seconds
        for run in self.runs:
            if run.final or run.start_s is None or run.start_s > self.now_s:
                continue
            # ElapsedRaw leaves suspended time out: it may grow slower than the wall clock
            wall = self.now_s - run.start_s
            run.elapsed_s = min(wall, run.elapsed_s + (seconds // 2 if suspended else seconds))

    def _running(self) -> list[Run]:
        return [
            r
            for r in self.runs
            if not r.final and r.start_s is not None and r.start_s <= self.now_s
        ]

    @rule(data=st.data())
    @precondition(lambda self: bool(self._running()))
    def job_ends(self, data: st.DataObject) -> None:
        run = data.draw(st.sampled_from(self._running()))
        run.final = True
        run.ended_s = self.now_s
        # slurmdbd may learn of the end late, but less than sacct.lag (2 min) late
        run.end_known_s = self.now_s + data.draw(st.sampled_from([0, 0, 40, 110]))

    @rule(data=st.data())
    @precondition(lambda self: bool(self._running()))
    def job_requeued(self, data: st.DataObject) -> None:
        """The run ends (billed as it is) and the same job id runs again with a new Submit."""
        run = data.draw(st.sampled_from(self._running()))
        run.final = True
        self.now_s += 1
        self.runs.append(
            Run(
                run.job_id,
                self.now_s,
                self.now_s + 60,
                run.account,
                run.partition,
                run.cpu,
                run.gpu,
            )
        )

    # ------------------------------------------------------------------ the agent
    def sync(self, crash: Optional[str] = None) -> None:
        path = self.dir / "sacct.txt"
        path.write_bytes(live_capture([r.row(self.now_s) for r in self.runs]))
        client = AllocationsClient(
            BASE,
            "org",
            "pwt_test.secret",
            sleep=lambda _s: None,
            max_attempts=3,
            max_retry_time_s=3600,
        )
        now_at = T0 + timedelta(seconds=self.now_s)
        store = CrashingState.open(self.dir / "state.db")
        assert isinstance(store, CrashingState)
        store.crash_at = crash
        request = pipeline.SyncRequest(now_at, str(path), None, io.BytesIO(), {})
        try:
            pipeline.sync_once(self.config, store, client, None, request)
        except Crash:
            pass  # the process died; the next sync starts from the state file as it is
        finally:
            store.close()

    @rule(faults=st.lists(st.sampled_from(FAULTS), max_size=6), crash=st.sampled_from(CRASHES))
    def sync_with_trouble(self, faults: list[str], crash: Optional[str]) -> None:
        self.api.faults = list(faults)
        self.sync(crash)

    @rule()
    def sync_cleanly(self) -> None:
        self.api.faults = []
        self.sync()

    # ------------------------------------------------------------------ the invariants
    @invariant()
    def no_event_key_accepted_twice(self) -> None:
        assert len(self.api.keys()) == len(set(self.api.keys()))

    @invariant()
    def never_billed_more_than_measured(self) -> None:
        billed = self.api.billed()
        for run in self.runs:
            for metric in ("cpu", "gpu"):
                got = billed.get((run.key, metric), Decimal(0))
                assert got <= run.truth(metric) + Decimal("0.00001"), (run, metric, got)

    @rule()
    @precondition(lambda self: len(self.runs) >= 3)
    def everything_ends_and_is_billed_exactly(self) -> None:
        """Faults stop, every job ends, dead events are retried: everything is billed."""
        for run in self.runs:
            if run.start_s is not None and run.start_s > self.now_s:
                self.now_s = run.start_s
        for run in self.runs:
            if not run.final:
                if run.start_s is not None:  # slurmdbd never rewrites a final run's ElapsedRaw
                    run.elapsed_s = max(run.elapsed_s, 1)
                run.final, run.ended_s, run.end_known_s = True, self.now_s, self.now_s
        # slurmdbd has caught up with every end
        self.now_s = max([self.now_s] + [r.end_known_s for r in self.runs])
        self.api.faults = []
        store = State.open(self.dir / "state.db")
        store.retry(None, T0)
        store.close()
        self.sync()
        self.sync()
        billed = self.api.billed()
        events = len(self.api.events)
        for run in self.runs:
            mapped = run.account != "unmapped-lab"
            for metric in ("cpu", "gpu"):
                if metric == "gpu" and run.partition != "gpu":
                    continue
                got = billed.get((run.key, metric), Decimal(0))
                want = run.truth(metric) if mapped else Decimal(0)
                assert abs(got - want) <= Decimal("0.000001") * max(events, 1), (run, metric, got)


SyncMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SYNC_MACHINE_EXAMPLES", "60")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestSyncMachine = SyncMachine.TestCase


def test_a_job_slurmdbd_has_not_seen_end_is_not_overbilled() -> None:
    """The sequence the box showed (tests/e2e): a job ends, slurmdbd learns of it 110 s later,
    and a sync in between sees it running with an ElapsedRaw 45 s past its true end."""
    machine = SyncMachine()
    try:
        machine.first_job()
        machine.time_passes(599, suspended=False)
        machine.sync_cleanly()
        machine.time_passes(601, suspended=False)
        run = machine.runs[0]
        run.final, run.ended_s, run.end_known_s = True, machine.now_s, machine.now_s + 110
        machine.time_passes(45, suspended=False)
        machine.sync_cleanly()
        machine.never_billed_more_than_measured()
        machine.time_passes(601, suspended=False)
        machine.sync_cleanly()
        assert machine.api.billed()[(run.key, "cpu")] == run.truth("cpu").quantize(
            Decimal("0.000001")
        )
    finally:
        machine.teardown()
