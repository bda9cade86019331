"""Drive the real Slurm test cluster ("the box", tests/e2e/box/start.sh) from end-to-end tests.

Submitting, waiting, suspending, requeueing and cancelling go through the Slurm commands, as an
admin would. ``truth()`` reads what slurmdbd finally recorded with its own ``sacct`` call and its
own small parser, independent of slurm_tracker, so that tests can compare the agent's output
against it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Optional

BOX_RUN = Path("/run/slurm-box")
BOX_DAEMONS = {
    "munged": "munged",
    "mariadb": "mariadbd",
    "slurmdbd": "slurmdbd",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
}
JOBS_DIR = "/tmp/slurm-box-jobs"  # world-writable, made by start.sh
COMMAND_TIMEOUT_S = 60
POLL_S = 0.5
# squeue states of a job that is not over yet (anything else is over or on its way out)
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "SUSPENDED",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
# Fields of the truth query: no free text, so a plain '|' cannot appear inside a value.
TRUTH_FIELDS = (
    "Cluster",
    "JobID",
    "JobIDRaw",
    "Submit",
    "End",
    "ElapsedRaw",
    "State",
    "Account",
    "Partition",
    "AllocTRES",
    "NodeList",
)
MEM_UNITS_MB = {
    "K": Decimal(1) / 1024,
    "M": Decimal(1),
    "G": Decimal(1024),
    "T": Decimal(1024 * 1024),
    "P": Decimal(1024**3),
}

RunId = tuple[str, str, int]  # (cluster, JobIDRaw, Submit as epoch seconds)


class BoxError(RuntimeError):
    """A Slurm command failed, or the box did not reach the expected state in time."""


@dataclass(frozen=True)
class TruthRun:
    """One run of a job (an allocation record) as slurmdbd finally recorded it."""

    job_id: str  # as users see it: 12, 12_3
    account: str
    partition: str
    elapsed_s: int  # ElapsedRaw: wall time minus suspended time
    cpu: int
    gpu: int  # gres/gpu; typed counts only when the untyped one is missing
    mem_mb: Decimal  # MiB
    node: int  # node count (TRES node=)
    nodelist: str
    state: str  # first word, e.g. CANCELLED for "CANCELLED by 0"
    final: bool  # End is known: the run cannot grow any more


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TZ": "UTC", "SLURM_TIME_FORMAT": "%s", "LC_ALL": "C"})
    for name in ("SQUEUE_FORMAT", "SQUEUE_FORMAT2", "SACCT_FORMAT", "SLURM_CLUSTERS"):
        env.pop(name, None)
    return env


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command with a UTC, epoch-seconds environment; BoxError when it fails."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BoxError(f"{' '.join(argv)}: could not run: {exc}") from exc
    if check and done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise BoxError(f"{' '.join(argv)}: exit {done.returncode}: {said}")
    return done


def _pid_alive(name: str, comm: str) -> bool:
    try:
        pid = (BOX_RUN / f"{name}.pid").read_text().strip()
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except OSError:
        return False


def box_available() -> Optional[str]:
    """None when the box can run jobs; otherwise why not (for a skip or failure message)."""
    if os.geteuid() != 0:
        return "not root: the box's tests submit as other users and suspend and requeue jobs"
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        return "no sbatch/sacct on PATH: start the box with `make e2e-up` (as root)"
    down = [name for name, comm in BOX_DAEMONS.items() if not _pid_alive(name, comm)]
    if down:
        return f"box not running ({', '.join(down)} down): start it with `make e2e-up`"
    ping = run("scontrol", "ping", check=False)
    if "UP" not in ping.stdout:
        return f"slurmctld does not answer `scontrol ping`: {ping.stdout.strip() or ping.stderr}"
    nodes = run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in nodes):
        return f"no usable node in the box (sinfo node states: {nodes or 'none'})"
    return None


def submit(
    *sbatch_args: str,
    account: str,
    partition: str = "compute",
    wrap: str = "sleep 1",
    user: Optional[str] = None,
    job_name: Optional[str] = None,
) -> str:
    """Submit a batch job with ``sbatch --parsable``; return its job id (e.g. '12').

    ``user`` submits as that local user (runuser); extra ``sbatch_args`` go before --wrap,
    e.g. ``"--gres=gpu:2", "-c", "4", "--mem=500M", "--array=0-3", "--time=1"``.
    """
    argv = [
        "sbatch",
        "--parsable",
        f"--account={account}",
        f"--partition={partition}",
        f"--chdir={JOBS_DIR}",
        "--output=/dev/null",
    ]
    if job_name is not None:
        argv.append(f"--job-name={job_name}")
    argv += [*sbatch_args, f"--wrap={wrap}"]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    out = run(*argv).stdout.strip()
    job_id = out.split(";", 1)[0]
    if not job_id.isdigit():
        raise BoxError(f"{' '.join(argv)}: unexpected output {out!r}")
    return job_id


def current_state(job_id: str) -> str:
    """The job's state now: from slurmctld while it knows the job, else from accounting."""
    # -j on an array's parent id lists all its tasks: only an exact match counts
    lines = run("squeue", "-h", "--states=all", "-j", job_id, "-o", "%i|%T", check=False)
    for line in lines.stdout.splitlines():
        shown, _, state = line.partition("|")
        if shown == job_id:
            return state.strip()
    rows = _sacct_rows([job_id], ("JobID", "State"))
    states = [row["State"] for row in rows if row["JobID"] == job_id]
    return states[-1].split()[0] if states else "UNKNOWN"


def wait_state(job_id: str, states: Iterable[str], timeout: float = 120) -> str:
    """Wait until the job is in one of ``states`` (e.g. {"RUNNING"}); return that state."""
    wanted = {s.upper() for s in states}
    deadline = time.monotonic() + timeout
    state = current_state(job_id)
    while state not in wanted:
        if time.monotonic() > deadline:
            raise BoxError(f"job {job_id} is {state}, not {sorted(wanted)}, after {timeout}s")
        time.sleep(POLL_S)
        state = current_state(job_id)
    return state


def _belongs(shown: str, raw: str, job_id: str) -> bool:
    """A record or queue line (JobID, JobIDRaw) is of ``job_id``: itself, or a task of it."""
    return job_id in (shown, raw) or shown.startswith(f"{job_id}_")


def _finished(job_ids: Sequence[str]) -> set[str]:
    """Ids whose every run is settled in accounting and that slurmctld no longer runs.

    Settled: End is known and Partition is filled in. (slurmdbd can store a job's end before
    its start message: for a few seconds the record says COMPLETED, with an End, but with an
    empty Partition.) An array parent id ('12') is finished when all its tasks are.
    """
    rows = _sacct_rows(job_ids, ("JobID", "JobIDRaw", "End", "Partition"))
    queue = run("squeue", "-h", "--states=all", "-o", "%i|%A|%T", check=False).stdout
    active = []
    for line in queue.splitlines():
        shown, raw, state = ([*line.split("|"), "", ""])[:3]
        if state.strip() in ACTIVE_STATES:
            active.append((shown, raw))
    done = set()
    for job_id in job_ids:
        mine = [row for row in rows if _belongs(row["JobID"], row["JobIDRaw"], job_id)]
        if not mine or any(row["End"] in ("Unknown", "None", "") for row in mine):
            continue
        if any(not row["Partition"] for row in mine):
            continue
        if any(_belongs(shown, raw, job_id) for shown, raw in active):
            continue
        done.add(job_id)
    return done


def wait_all_done(job_ids: Iterable[str], timeout: float = 300) -> None:
    """Wait until every job (plain ids, array tasks like '12_3') is over and fully accounted."""
    ids = list(job_ids)
    deadline = time.monotonic() + timeout
    pending = set(ids) - _finished(ids)
    while pending:
        if time.monotonic() > deadline:
            raise BoxError(f"jobs {sorted(pending)} not finished in accounting after {timeout}s")
        time.sleep(POLL_S)
        pending -= _finished(sorted(pending))


def requeue(job_id: str, start_now: bool = True) -> None:
    """Requeue a running job (its run so far becomes a REQUEUED record).

    Slurm holds a requeued job back for about two minutes (BeginTime); ``start_now`` moves its
    begin time to now so that the second run starts at once. That must wait until the job is
    PENDING: the hold is set while the first run is COMPLETING and overrides earlier changes.
    A restart within the second of the requeue fails ("Job credential revoked", the second run
    ends FAILED at once), hence the pause.
    """
    run("scontrol", "requeue", job_id)
    if start_now:
        wait_state(job_id, {"PENDING"}, timeout=60)
        time.sleep(2)
        run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def suspend(job_id: str) -> None:
    """Suspend a running job (its suspended time does not count in ElapsedRaw)."""
    run("scontrol", "suspend", job_id)


def resume(job_id: str) -> None:
    """Resume a suspended job."""
    run("scontrol", "resume", job_id)


def cancel(job_id: str, signal: Optional[str] = None) -> None:
    """Cancel a job, or send it ``signal`` (e.g. "KILL") through scancel."""
    argv = ["scancel", job_id] if signal is None else ["scancel", f"--signal={signal}", job_id]
    run(*argv)


def _sacct_rows(job_ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, str]]:
    """Allocation records (all runs) of the given jobs, as {field: value}; no free-text fields."""
    if not job_ids:
        return []
    out = run(
        "sacct",
        "--allusers",
        "--allocations",
        "--duplicates",
        "--noheader",
        "--parsable2",
        f"--format={','.join(fields)}",
        f"--jobs={','.join(job_ids)}",
    ).stdout
    rows = []
    for number, line in enumerate(out.splitlines(), 1):
        values = line.split("|")
        if len(values) != len(fields):
            raise BoxError(f"sacct line {number}: {len(values)} fields, not {len(fields)}: {line}")
        rows.append(dict(zip(fields, values)))
    return rows


def parse_tres(text: str) -> Mapping[str, str]:
    """'cpu=2,mem=1.5G,gres/gpu=1' -> {'cpu': '2', 'mem': '1.5G', 'gres/gpu': '1'}."""
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {name: value for name, _, value in pairs}


def mem_mb(value: str) -> Decimal:
    """A Slurm memory amount ('100M', '1.50G', '2048' = MiB) in MiB."""
    if not value:
        return Decimal(0)
    unit = value[-1].upper()
    if unit in MEM_UNITS_MB:
        return Decimal(value[:-1]) * MEM_UNITS_MB[unit]
    return Decimal(value)


def gpu_count(tres: Mapping[str, str]) -> int:
    """gres/gpu when present, else the sum of the typed gres/gpu:TYPE counts (never both)."""
    if "gres/gpu" in tres:
        return int(tres["gres/gpu"])
    return sum(int(v) for k, v in tres.items() if k.startswith("gres/gpu:"))


def truth(job_ids: Iterable[str]) -> dict[RunId, TruthRun]:
    """Every run of the given jobs, keyed by (cluster, JobIDRaw, Submit epoch), from slurmdbd.

    Array parent ids (e.g. '12') cover all their tasks. Call after ``wait_all_done`` for final
    figures; runs still going have ``final=False`` and a growing ``elapsed_s``.
    """
    result: dict[RunId, TruthRun] = {}
    for row in _sacct_rows(list(job_ids), TRUTH_FIELDS):
        tres = parse_tres(row["AllocTRES"])
        key = (row["Cluster"], row["JobIDRaw"], int(row["Submit"]))
        result[key] = TruthRun(
            job_id=row["JobID"],
            account=row["Account"],
            partition=row["Partition"],
            elapsed_s=int(row["ElapsedRaw"]),
            cpu=int(tres.get("cpu", "0")),
            gpu=gpu_count(tres),
            mem_mb=mem_mb(tres.get("mem", "")),
            node=int(tres.get("node", "0")),
            nodelist=row["NodeList"],
            state=row["State"].split()[0] if row["State"] else "",
            final=row["End"] not in ("Unknown", "None", ""),
        )
    return result


# -- stopping and starting daemons (added for the end-to-end scenarios) ----------------------

BOX_START = Path(__file__).resolve().parent / "box" / "start.sh"


def daemon_pid(name: str) -> Optional[int]:
    """The pid start.sh recorded for daemon ``name`` when that process is alive and is it."""
    if not _pid_alive(name, BOX_DAEMONS[name]):
        return None
    return int((BOX_RUN / f"{name}.pid").read_text().strip())


def stop_daemon(name: str, timeout: float = 60) -> None:
    """SIGTERM one of the box's daemons by its recorded pid and wait until it is gone."""
    pid = daemon_pid(name)
    if pid is None:
        raise BoxError(f"{name} is not running (no live pid in {BOX_RUN}/{name}.pid)")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and _comm_state(pid) not in ("", "Z"):
        if time.monotonic() > deadline:
            raise BoxError(f"{name} (pid {pid}) still alive {timeout}s after SIGTERM")
        time.sleep(0.1)


def _comm_state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return ""
    return ""


def start_box() -> None:
    """Run tests/e2e/box/start.sh (idempotent: it starts only the daemons that are down)."""
    try:
        done = subprocess.run(
            ["bash", str(BOX_START)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BoxError(f"{BOX_START}: could not run: {exc}") from exc
    if done.returncode != 0:
        raise BoxError(f"{BOX_START}: exit {done.returncode}: {done.stderr[-2000:]}")
