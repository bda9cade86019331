"""Running sacct: the only module that starts a subprocess.

The live query asks for allocations only (``--allocations``), requeued runs as separate records
(``--duplicates``), ``-p`` output (a trailing delimiter after every record) with an unusual
multi-character delimiter, and the free-text JobName last, so that ``|`` and newlines in job
names cannot break a record (see DESIGN.md, "sacct facts").
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from .errors import SacctUnavailable

logger = logging.getLogger(__name__)

LIVE_DELIMITER = "|#|"
LIVE_FIELDS = (
    "Cluster",
    "JobID",
    "JobIDRaw",
    "Account",
    "Partition",
    "User",
    "Group",
    "QOS",
    "Submit",
    "Eligible",
    "Start",
    "End",
    "ElapsedRaw",
    "State",
    "ExitCode",
    "AllocTRES",
    "NNodes",
    "NodeList",
    "Reservation",
    "JobName",
)  # free text (JobName) last

#: Environment variables sacct reads (sacct(1), ENVIRONMENT VARIABLES) that would change which
#: jobs it selects or how it prints them. SLURM_CONF is kept: it says which cluster to ask.
_DROPPED_ENV = frozenset(
    {
        "SACCT_FORMAT",  # --format; ours wins anyway, dropped for clarity
        "SACCT_FEDERATION",  # --federation: would add other clusters' jobs
        "SACCT_LOCAL",  # --local
        "SLURM_BITSTR_LEN",  # truncates array task expressions in JobID
        "SLURM_TIME_FORMAT",  # replaced by %s below
        "SLURM_JSON",  # --json output style
        "SLURM_YAML",  # --yaml output style
    }
)

_STDERR_LINES = 10
_KILL_WAIT_S = 5.0


def _utc_text(at: datetime) -> str:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"sacct window bound {at!r} must be timezone-aware")
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def build_command(
    sacct_path: str,
    start_at: datetime,
    end_at: datetime,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv of one live sacct query for jobs overlapping [start_at, end_at).

    Times are written in UTC without an offset: sacct runs with ``TZ=UTC``
    (see :func:`sacct_environment`).
    """
    return [
        sacct_path,
        "--allusers",
        "--allocations",
        "--duplicates",
        "--parsable",
        f"--delimiter={LIVE_DELIMITER}",
        "--format=" + ",".join(LIVE_FIELDS),
        "--starttime",
        _utc_text(start_at),
        "--endtime",
        _utc_text(end_at),
        *extra_args,
    ]


def sacct_environment(base: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``base`` that makes sacct print UTC epoch seconds and select what we ask for."""
    env = {
        key: value
        for key, value in base.items()
        if key not in _DROPPED_ENV and not key.startswith("SACCT_")
    }
    env["TZ"] = "UTC"
    env["SLURM_TIME_FORMAT"] = "%s"
    return env


def _stderr_tail(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "  (sacct printed nothing on stderr)"
    return "\n".join(f"  | {line[:500]}" for line in lines[-_STDERR_LINES:])


def _unavailable(command: str, what: str, stderr: bytes = b"") -> SacctUnavailable:
    tail = _stderr_tail(stderr)
    return SacctUnavailable(
        f"sacct {what}: {command}\n{tail}\n"
        "This is treated as a temporary failure: nothing was recorded or advanced, and the next "
        "run (cron) will try again. If it persists, run the command above by hand and check "
        "slurmdbd."
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill sacct and anything it started (it runs in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_sacct(argv: Sequence[str], *, timeout_s: float, environ: Mapping[str, str]) -> bytes:
    """Run sacct (never through a shell) and return its stdout.

    Raises SacctUnavailable when the program cannot be started, exits non-zero or runs longer
    than ``timeout_s`` (it is then killed).
    """
    command = shlex.join(argv)
    logger.debug("running %s", command)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(environ),
            start_new_session=True,
        )
    except OSError as exc:
        raise _unavailable(command, f"could not be started ({exc.strerror or exc})") from exc
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        try:
            _, stderr = proc.communicate(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # something it started still holds the pipes
            proc.kill()
            proc.wait()
            stderr = b""
        raise _unavailable(
            command, f"timed out after {timeout_s:g} s and was killed", stderr
        ) from exc
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        if proc.returncode < 0:
            what = f"was killed by signal {-proc.returncode}"
        else:
            what = f"failed with exit status {proc.returncode}"
        raise _unavailable(command, what, stderr)
    logger.debug("sacct returned %d bytes", len(stdout))
    return stdout
