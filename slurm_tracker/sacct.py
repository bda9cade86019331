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

sacct's output is never held whole: :func:`stream_sacct` hands it on block by block as it
comes (the agent spools it to a temporary file, inputs.call_sacct), with stderr in a
temporary file, a deadline for the whole call, and the exit status checked after the output
was read.

The field lists and delimiters live in :mod:`slurm_tracker.sacct_format` (the readers import
them from there without importing this module); they are re-exported here on purpose, for the
callers that build queries (inputs.call_sacct, the benchmarks, tests) and import them from
``sacct``.
"""

from __future__ import annotations

import io
import logging
import os
import selectors
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import BinaryIO, Optional

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
_STDERR_TAIL_BYTES = 1 << 18  # the end of stderr read for its last lines
_READ_BYTES = 1 << 20  # read from sacct's stdout at a time (a pipe gives what it holds)
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


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a killed sacct (if its group ignores the kill, for sacct itself only)."""
    try:
        proc.wait(timeout=_KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail_of(stderr: BinaryIO) -> bytes:
    """The end of what sacct wrote on stderr (the last lines are shown), from its first full
    line when it was cut."""
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - _STDERR_TAIL_BYTES))
    tail = stderr.read()
    return tail if size <= _STDERR_TAIL_BYTES else tail[tail.find(b"\n") + 1 :]


def stream_sacct(
    argv: Sequence[str],
    write: Callable[[bytes], object],
    *,
    timeout_s: float,
    environ: Mapping[str, str],
) -> int:
    """Run sacct (never through a shell), giving its stdout to ``write`` block by block as it
    comes (nothing holds it whole); returns its size.

    stderr goes to an anonymous temporary file (neither pipe can fill up and block sacct
    while the other is read); its last lines are in the errors. Raises SacctUnavailable when
    the program cannot be started, runs longer than ``timeout_s`` (it is then killed, with
    what it started), or exits non-zero; that is known only once its output was read, so a
    caller must not use the output before this returns. When ``write`` raises, sacct is
    killed and the exception goes on.
    """
    command = shlex.join(argv)
    logger.debug("running %s", command)
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=dict(environ),
                start_new_session=True,
            )
        except OSError as exc:
            raise _unavailable(command, f"could not be started ({exc.strerror or exc})") from exc
        deadline = time.monotonic() + timeout_s
        try:
            size = _pump(proc, write, deadline)
            if size is not None:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            size = None
        except BaseException:
            _kill_group(proc)
            _reap(proc)
            raise
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
        if size is None:
            _kill_group(proc)
            _reap(proc)
            raise _unavailable(
                command, f"timed out after {timeout_s:g} s and was killed", _tail_of(stderr)
            )
        if proc.returncode != 0:
            if proc.returncode < 0:
                what = f"was killed by signal {-proc.returncode}"
            else:
                what = f"failed with exit status {proc.returncode}"
            raise _unavailable(command, what, _tail_of(stderr))
    logger.debug("sacct returned %d bytes", size)
    return size


def _pump(
    proc: subprocess.Popen[bytes], write: Callable[[bytes], object], deadline: float
) -> Optional[int]:
    """Copy sacct's stdout to ``write`` until it is closed; its size, or None at the deadline."""
    assert proc.stdout is not None
    descriptor = proc.stdout.fileno()
    size = 0
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return None
            block = os.read(descriptor, _READ_BYTES)
            if not block:
                return size
            size += len(block)
            write(block)


def run_sacct(argv: Sequence[str], *, timeout_s: float, environ: Mapping[str, str]) -> bytes:
    """Run sacct (never through a shell) and return its stdout, whole (:func:`stream_sacct`,
    which the agent uses, never holds it).

    Raises SacctUnavailable when the program cannot be started, exits non-zero or runs longer
    than ``timeout_s`` (it is then killed).
    """
    out = io.BytesIO()
    stream_sacct(argv, out.write, timeout_s=timeout_s, environ=environ)
    return out.getvalue()


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
    "stream_sacct",
]
