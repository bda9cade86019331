"""Running sacct: the only module that starts a subprocess.

The live query asks for allocations only (``--allocations``), requeued runs as separate records
(``--duplicates``) and ``-p`` output (the delimiter after every field, the last one included).
sacct has no escaping, and users choose their job names, so the query is built so that no byte
sequence in a user's text can create, change, hide or merge a record (README, "Security"):

* the delimiter is drawn afresh for every call from 128 random bits (:func:`new_delimiter`):
  a job name written before the call cannot contain it, so records are split on it exactly;
* the only user-controlled text, JobName, is asked for only when the configuration sends job
  names as metadata, and then last;
* parse.parse_live checks the header and the exact field count of every record.

The field lists and delimiters live in :mod:`slurm_tracker.sacct_format` (the readers import
them from there without importing this module); they are re-exported here on purpose, for the
callers that build queries (pipeline, costs.reading, tests) and import them from ``sacct``.
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
from .sacct_format import (
    CAPTURE_DELIMITER,
    DELIMITER_RE,
    FREE_TEXT_FIELD,
    LIVE_FIELDS,
    REPORT_FIELDS,
    live_fields,
    new_delimiter,
    report_fields,
)

logger = logging.getLogger(__name__)

#: The only variables sacct gets (an allow-list: never the API key, nothing that changes which
#: jobs it selects or how it prints them, such as SACCT_FORMAT, SACCT_FEDERATION,
#: SLURM_BITSTR_LEN or SLURM_TIME_FORMAT). SLURM_CONF says which cluster to ask, SLURM_JWT
#: authenticates on sites using auth/jwt; the rest is what any program needs to start.
_KEPT_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "SLURM_CONF",
        "SLURM_JWT",
    }
)
_KEPT_PREFIXES = ("LC_",)

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
    *,
    delimiter: str,
    fields: Sequence[str] = LIVE_FIELDS,
    clusters: Sequence[str] = (),
) -> list[str]:
    """The argv of one live sacct query for jobs overlapping [start_at, end_at).

    ``delimiter`` comes from :func:`new_delimiter`. Times are written in UTC without an offset:
    sacct runs with ``TZ=UTC`` (see :func:`sacct_environment`). ``clusters`` (from the config's
    sacct.clusters) become ``--clusters``; ``extra_args`` were checked by the config's
    allow-list.
    """
    if not DELIMITER_RE.fullmatch(delimiter):
        raise ValueError("the live delimiter must come from new_delimiter()")
    if FREE_TEXT_FIELD in fields and fields[-1] != FREE_TEXT_FIELD:
        raise ValueError("JobName must be the last field")
    argv = [
        sacct_path,
        "--allusers",
        "--allocations",
        "--duplicates",
        "--parsable",
        f"--delimiter={delimiter}",
        "--format=" + ",".join(fields),
        "--starttime",
        _utc_text(start_at),
        "--endtime",
        _utc_text(end_at),
    ]
    if clusters:
        argv.append("--clusters=" + ",".join(clusters))
    return [*argv, *extra_args]


def sacct_environment(base: Mapping[str, str]) -> dict[str, str]:
    """What sacct runs with: the allow-listed part of ``base``, UTC and epoch-second times."""
    env = {
        key: value
        for key, value in base.items()
        if key in _KEPT_ENV or key.startswith(_KEPT_PREFIXES)
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


# --- the cost and utilisation report (slurm_tracker.costs): allocations AND their steps ------


def build_report_command(
    sacct_path: str,
    start_at: datetime,
    end_at: datetime,
    extra_args: Sequence[str] = (),
    *,
    delimiter: str,
    fields: Sequence[str],
    clusters: Sequence[str] = (),
) -> list[str]:
    """The argv of one report query: like :func:`build_command` (same delimiter, environment
    and JobName rules), but with the step records of each allocation."""
    argv = build_command(
        sacct_path,
        start_at,
        end_at,
        extra_args,
        delimiter=delimiter,
        fields=fields,
        clusters=clusters,
    )
    argv.remove("--allocations")
    return argv


__all__ = [
    "CAPTURE_DELIMITER",
    "FREE_TEXT_FIELD",
    "LIVE_FIELDS",
    "REPORT_FIELDS",
    "build_command",
    "build_report_command",
    "live_fields",
    "new_delimiter",
    "report_fields",
    "run_sacct",
    "sacct_environment",
]
