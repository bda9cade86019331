"""Run slurm-tracker as cron would, against the API emulator, and check what it billed.

:class:`Agent` writes a config for one test (its own state file and emulator), runs the
``slurm-tracker`` CLI as a subprocess and reads its outputs. :func:`check_billing` compares what
the emulator accepted with what Slurm finally recorded (:func:`tests.e2e.cluster.truth`),
per run, per allocation and SKU, and exactly: the accepted pieces of every run and SKU must
tile its elapsed seconds ``[0, ElapsedRaw)`` with no gap and no overlap. :class:`Jobs`
submits a test's jobs and cancels whatever is left of them at the end.

The box is shared and keeps its accounting history, so the agent also bills other tests' jobs
that fall in its window: everything here counts only the runs of the test's own jobs.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional, cast

from tests.e2e import cluster
from tests.emulator import DEFAULT_API_KEY, Emulator, StoredEvent

REPO = Path(__file__).resolve().parents[2]
EXIT_OK = 0
EXIT_UNDELIVERED = 4
EXIT_TEMPFAIL = 75
COMMAND_TIMEOUT_S = 120
POLL_S = 0.05
TOLERANCE = Decimal("0.000001")  # per event: quantities are sent rounded to 6 decimals

#: What the config below maps: Slurm account -> allocation (unmapped-lab is left out on
#: purpose), partition -> (SKU, metric) charges.
ACCOUNTS: Mapping[str, str] = {"physics": "physics", "chemistry": "chemistry"}
PARTITIONS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "compute": (("CPU_HOUR", "cpu"),),
    "gpu": (("GPU_HOUR", "gpu"), ("CPU_HOUR", "cpu")),
}

CONFIG = """\
cluster: box
state_file: {state}
reporting_interval: 2s
api:
  organization: test-org
  url: "{url}"
  connect_timeout: 2s
  read_timeout: {read_timeout}
  max_attempts: {max_attempts}
  max_retry_time: {max_retry_time}
  concurrency: {concurrency}
sacct:
  lag: {lag}
  overlap: 2m
  first_sync_start: "{first_sync_start}"
  timeout: 60s
accounts:
  map: {{physics: physics, chemistry: chemistry}}
partitions:
  map:
    compute: CPU_HOUR
    gpu: [{{sku: GPU_HOUR, metric: gpu}}, {{sku: CPU_HOUR, metric: cpu}}]
"""
DEFAULT_SETTINGS: Mapping[str, str] = {
    "read_timeout": "10s",
    "max_attempts": "5",
    "max_retry_time": "30s",
    "concurrency": "4",
    "lag": "1s",
}


def rfc3339(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Done:
    """A finished CLI run."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (
            f"`{' '.join(self.argv)}` exited {self.returncode}\n"
            f"--- stdout\n{self.stdout.strip()}\n--- stderr\n{self.stderr.strip()}"
        )


class Agent:
    """slurm-tracker with a config of its own in ``workdir`` (state file beside it)."""

    def __init__(
        self,
        workdir: Path,
        api_url: str,
        first_sync_start_at: datetime,
        *,
        extra_config: str = "",
        **settings: str,
    ) -> None:
        """``extra_config``: YAML appended to the config as is (top-level sections the
        template leaves out, e.g. ``"metadata: {fields: [job_name]}\n"``)."""
        self.workdir = workdir
        self.config = workdir / "config.yaml"
        self.state = workdir / "state" / "state.db"
        self.api_url = api_url
        self.first_sync_start_at = first_sync_start_at
        self.extra_config = extra_config
        self.settings = dict(DEFAULT_SETTINGS)
        self.configure(**settings)

    def configure(self, **settings: str) -> None:
        """(Re)write the config with these settings changed (api.*, sacct.lag), as an admin
        would."""
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"unknown agent settings {sorted(unknown)}")
        self.settings.update(settings)
        self.config.write_text(
            CONFIG.format(
                state=self.state,
                url=self.api_url,
                first_sync_start=rfc3339(self.first_sync_start_at),
                **self.settings,
            )
            + self.extra_config
        )

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "slurm_tracker", *args]

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("SLURM_TRACKER_CONFIG", "PW_PLATFORM_HOST")
        }
        env.update({"PW_API_KEY": DEFAULT_API_KEY, "PYTHONPATH": str(REPO)})
        return env

    def start(self, command: str, *args: str) -> subprocess.Popen[str]:
        """Start ``slurm-tracker COMMAND --config ... ARGS`` without waiting for it."""
        return subprocess.Popen(
            self.argv(*command.split(), "--config", str(self.config), *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=self.workdir,
        )

    def run(self, command: str, *args: str, expect: Collection[int] = (EXIT_OK,)) -> Done:
        """Run a command to its end; fail the test when its exit code is not in ``expect``."""
        proc = self.start(command, *args)
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"`slurm-tracker {command}` hung for {COMMAND_TIMEOUT_S}s\n{err}"
            ) from None
        done = Done(tuple(map(str, cast(Sequence[str], proc.args))), proc.returncode, out, err)
        assert done.returncode in expect, f"expected exit {sorted(expect)}: {done}"
        return done

    def sync(self, *args: str, expect: Collection[int] = (EXIT_OK,)) -> Done:
        """One real sync (``--output json``: its summary is ``.json()``)."""
        return self.run("sync", "--output", "json", *args, expect=expect)

    def dry_run(self, *args: str) -> dict[str, Any]:
        """``sync --dry-run --output json``: the plan document."""
        return dict(self.run("sync", "--dry-run", "--output", "json", *args).json())

    def outbox(self, *statuses: str) -> list[dict[str, Any]]:
        args = [arg for status in statuses for arg in ("--status", status)]
        return list(self.run("outbox list", "--output", "json", *args).json())

    def status(self) -> dict[str, Any]:
        return dict(self.run("status", "--output", "json").json())

    # -- the state file, from outside

    def state_files(self) -> dict[str, bytes]:
        """Every file of the state directory (state file, WAL, lock) and its bytes."""
        folder = self.state.parent
        if not folder.exists():
            return {}
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def state_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the state file's tables (high-water mark, progress, outbox, syncs)."""
        conn = sqlite3.connect(str(self.state))
        try:
            return {
                table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("meta", "progress", "outbox", "syncs")
            }
        finally:
            conn.close()


def kill(proc: subprocess.Popen[str]) -> Done:
    """SIGKILL a running agent (no chance to clean up) and collect it."""
    assert proc.poll() is None, "the agent ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    return Done(tuple(map(str, cast(Sequence[str], proc.args))), proc.returncode, out, err)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def stuck_request(
    emulator: Emulator, since: int = 0, proc: Optional[subprocess.Popen[str]] = None
) -> Callable[[], Optional[dict[str, Any]]]:
    """A check for :func:`wait_for`: the request now held by a ``slow`` fault, if any.

    A request is held while the emulator has recorded it (as request number ``since`` or
    later), with a slow fault of non-zero delay, and has not answered it (its status is still
    None). With ``proc``, the agent ending before that fails the test.
    """

    def check() -> Optional[dict[str, Any]]:
        for entry in emulator.requests()[since:]:
            fault = entry.get("fault") or {}
            if fault.get("kind") == "slow" and fault.get("delay") and entry["status"] is None:
                return entry
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the agent ended (exit {proc.returncode}) before it got stuck: {out}\n{err}"
            )
        return None

    return check


# -- jobs ------------------------------------------------------------------------------------


class Jobs:
    """A test's jobs, by role; whatever is still queued or running is cancelled by ``close``."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}

    def submit(self, role: str, *sbatch_args: str, **kwargs: Any) -> str:
        job_id = cluster.submit(*sbatch_args, job_name=f"e2e-{role}", **kwargs)
        self.ids[role] = job_id
        return job_id

    def __getitem__(self, role: str) -> str:
        return self.ids[role]

    def all(self) -> list[str]:
        return list(self.ids.values())

    def wait_done(self, timeout: float = 240) -> None:
        """Every job over and settled in accounting, then past the agent's sacct lag."""
        cluster.wait_all_done(self.all(), timeout=timeout)
        time.sleep(1.5)  # sacct.lag is 1 s: every job started before the next window ends

    def close(self) -> None:
        if self.ids:
            cluster.run("scancel", *self.ids.values(), check=False)


# -- what was billed -----------------------------------------------------------------------


RunId = cluster.RunId


def run_of(event: StoredEvent) -> RunId:
    meta = event.metadata
    submitted = datetime.fromisoformat(str(meta["submittedAt"]).replace("Z", "+00:00"))
    return (str(meta["cluster"]), str(meta["jobIdRaw"]), int(submitted.timestamp()))


def mine(events: Iterable[StoredEvent], runs: Collection[RunId]) -> list[StoredEvent]:
    """The events of these runs (the test's own jobs) only."""
    return [e for e in events if run_of(e) in runs]


def expected_charges(run: cluster.TruthRun) -> dict[str, Decimal]:
    """SKU -> count x ElapsedRaw / 3600 of a run, by the config's mapping (none if unmapped)."""
    if run.account not in ACCOUNTS or run.partition not in PARTITIONS:
        return {}
    counts = {"cpu": run.cpu, "gpu": run.gpu}
    charges = {}
    for sku, metric in PARTITIONS[run.partition]:
        usage = Decimal(counts[metric]) * run.elapsed_s / 3600
        if usage > 0:
            charges[sku] = usage
    return charges


@dataclass
class Billing:
    """What :func:`check_billing` found: events per (run, SKU), and the totals it compared."""

    events: dict[tuple[RunId, str], list[StoredEvent]] = field(default_factory=dict)
    totals: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    def count(self, run: RunId, sku: str = "CPU_HOUR") -> int:
        return len(self.events.get((run, sku), []))


def duplicate_keys(events: Sequence[StoredEvent]) -> list[str]:
    seen: dict[Optional[str], int] = defaultdict(int)
    for event in events:
        seen[event.event_key] += 1
    return sorted(str(key) for key, n in seen.items() if n > 1)


def check_billing(
    events: Sequence[StoredEvent], truth: Mapping[RunId, cluster.TruthRun]
) -> Billing:
    """Assert that the accepted ``events`` bill the ``truth`` runs exactly once.

    - no event key was accepted twice (over all events, not only these runs');
    - per run and SKU, the accepted elapsed stretches ``[elapsedFrom, elapsedTo)`` tile
      ``[0, ElapsedRaw)`` exactly, each quantity is count x its seconds / 3600 (6 decimals),
      and the quantities add up to count x ElapsedRaw / 3600 within 1e-6 per event;
    - every event went to the run's allocation and carries its job id, account and partition;
    - runs that are unmapped, never started or hold none of a metric have no event;
    - per allocation and SKU, the accepted total equals the expected one (same tolerance).
    """
    assert not duplicate_keys(events), f"event keys accepted twice: {duplicate_keys(events)}"
    for run_id, run in truth.items():
        assert run.final, f"truth is not final for {run_id} ({run}): wait for the jobs first"
    billing = Billing()
    for event in mine(events, truth):
        billing.events.setdefault((run_of(event), event.sku), []).append(event)
    expected: dict[tuple[RunId, str], Decimal] = {}
    for run_id, run in truth.items():
        for sku, usage in expected_charges(run).items():
            expected[(run_id, sku)] = usage
    problems = []
    extra = sorted(set(billing.events) - set(expected))
    for run_id, sku in extra:
        keys = [e.event_key for e in billing.events[(run_id, sku)]]
        problems.append(f"{run_id} {sku}: billed, but expected nothing ({truth[run_id]}): {keys}")
    want_totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    got_totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    events_per_total: dict[tuple[str, str], int] = defaultdict(int)
    for (run_id, sku), want in sorted(expected.items()):
        run = truth[run_id]
        allocation = ACCOUNTS[run.account]
        got = billing.events.get((run_id, sku), [])
        want_totals[(allocation, sku)] += want
        events_per_total[(allocation, sku)] += max(1, len(got))
        problems += _run_problems(run_id, run, sku, want, got)
        for event in got:
            got_totals[(event.allocation, sku)] += event.quantity
    for total, want in sorted(want_totals.items()):
        got_total = got_totals.get(total, Decimal(0))
        if abs(got_total - want) > TOLERANCE * events_per_total[total]:
            problems.append(f"total of {total}: accepted {got_total}, expected {want}")
    assert not problems, "billing differs from Slurm's accounting:\n  " + "\n  ".join(problems)
    billing.totals = dict(got_totals)
    return billing


def _run_problems(
    run_id: RunId, run: cluster.TruthRun, sku: str, want: Decimal, got: Sequence[StoredEvent]
) -> list[str]:
    where = f"job {run.job_id} run {run_id} {sku} ({run.state}, elapsed {run.elapsed_s}s)"
    if not got:
        return [f"{where}: nothing billed, expected {want}"]
    problems = []
    count = {"CPU_HOUR": run.cpu, "GPU_HOUR": run.gpu}[sku]
    pieces = sorted((int(e.metadata["elapsedFrom"]), int(e.metadata["elapsedTo"])) for e in got)
    edge = 0
    for start, end in pieces:
        if start != edge:
            problems.append(f"{where}: billed pieces {pieces} leave a gap or overlap at {edge}s")
            break
        edge = end
    if edge != run.elapsed_s:
        problems.append(f"{where}: billed pieces {pieces} end at {edge}s, not {run.elapsed_s}s")
    total = sum((e.quantity for e in got), Decimal(0))
    if abs(total - want) > TOLERANCE * len(got):
        problems.append(f"{where}: accepted {total} in {len(got)} events, expected {want}")
    for event in got:
        meta = event.metadata
        seconds = int(meta["elapsedTo"]) - int(meta["elapsedFrom"])
        if abs(event.quantity - Decimal(count * seconds) / 3600) > TOLERANCE:
            problems.append(f"{event.event_key}: quantity {event.quantity} for {seconds}s")
        identity = (event.allocation, meta["jobId"], meta["account"], meta["partition"])
        if identity != (ACCOUNTS[run.account], run.job_id, run.account, run.partition):
            problems.append(f"{event.event_key}: allocation/jobId/account/partition {identity}")
    return problems


# -- syncing like cron, in the background --------------------------------------------------


class Syncer:
    """Runs a sync every ``period_s`` seconds in a thread until ``stop()``; keeps the results."""

    def __init__(self, agent: Agent, period_s: float, expect: Collection[int] = (EXIT_OK,)):
        self.agent = agent
        self.period_s = period_s
        self.expect = expect
        self.results: list[Done] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="syncer", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.agent.sync(expect=self.expect))
            except AssertionError as exc:
                self.failures.append(str(exc))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Syncer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        self.stop(check=exc_type is None)

    def stop(self, check: bool = True) -> list[Done]:
        """Stop after the sync in progress; fail if any sync had an unexpected exit code."""
        self._stop.set()
        self._thread.join(timeout=COMMAND_TIMEOUT_S + 10)
        assert not check or not self.failures, "a background sync failed:\n" + "\n".join(
            self.failures
        )
        return self.results


def seconds_ago(seconds: float) -> datetime:
    return utc_now() - timedelta(seconds=seconds)
