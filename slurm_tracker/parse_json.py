"""``sacct --json`` (Slurm 21.08 to 25.11) and slurmrestd ``/slurmdb`` job responses to
records (part of the reader, :mod:`slurm_tracker.parse`): one JobRecord or Rejected per job.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from .errors import InputError
from .models import JobRecord, ParseResult, Rejected, RunKey
from .parse_fields import (
    _NO_VAL,
    _Bad,
    _elapsed,
    _get,
    _jint,
    _json_snippet,
    _jstr,
    _snippet,
    parse_state,
)
from .parse_rows import _result
from .parse_tres import tres_from_json

logger = logging.getLogger("slurm_tracker.parse")  # the reader's one logger, whichever module


def _parse_json(data: bytes, *, cluster: str, source: str) -> ParseResult:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(
            f"{source}: starts with '{{' but is not valid JSON ({exc}); expected the output of "
            "sacct --json or a slurmrestd /slurmdb jobs response"
        ) from exc
    jobs = document.get("jobs") if isinstance(document, dict) else None
    if not isinstance(jobs, list):
        errors = document.get("errors") if isinstance(document, dict) else None
        detail = f" (its errors: {_snippet(json.dumps(errors))})" if errors else ""
        raise InputError(
            f'{source}: JSON without a "jobs" list{detail}; expected the output of sacct '
            "--json or a slurmrestd /slurmdb jobs response"
        )
    if isinstance(document, dict) and document.get("errors"):
        logger.warning("%s: the JSON reports errors: %s", source, _json_snippet(document["errors"]))
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    steps = 0
    for index, job in enumerate(jobs, start=1):
        if isinstance(job, dict) and isinstance(job.get("steps"), list):
            steps += len(job["steps"])
        try:
            records.append(_record_from_json(job, index=index, cluster=cluster))
        except Exception as exc:  # a corrupt record must never stop the run
            reason = str(exc) if isinstance(exc, _Bad) else f"{type(exc).__name__}: {exc}"
            job_id, run = _json_identity(job, cluster)
            rejected.append(
                Rejected(
                    index,
                    f"job #{index}: {_snippet(reason)}",
                    _json_snippet(job),
                    job_id=job_id,
                    run=run,
                )
            )
    return _result(source, records, rejected, steps)


def _json_identity(job: Any, cluster: str) -> tuple[str, Optional[RunKey]]:
    """The job id and run of a JSON job, as far as they can be read (for the quarantine)."""
    try:
        job_id = _jint(job.get("job_id"), "job_id")
        submit_at = _jtime(job, "submission")
        name = _jstr(job.get("cluster"), "cluster") or cluster
    except Exception:  # best effort
        return "", None
    if job_id is None or submit_at is None:
        return ("" if job_id is None else str(job_id)), None
    return str(job_id), RunKey(name, str(job_id), submit_at)


def _jtime(job: Any, key: str) -> Optional[datetime]:
    seconds = _jint(_get(job, "time", key), f"time.{key}")
    if seconds is None or seconds == 0:
        return None  # 0: not known (yet)
    if seconds < 0:
        raise _Bad(f"time.{key} {seconds} is negative")
    try:
        return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    except OverflowError as exc:
        raise _Bad(f"time.{key} {seconds} is out of range") from exc


def _json_state(state: Any) -> str:
    current = state.get("current") if isinstance(state, dict) else state
    if isinstance(current, list):  # 23.11+: ["CANCELLED", flags...]
        current = next((c for c in current if isinstance(c, str)), "")
    return parse_state(_jstr(current, "state.current"))


def _json_display_id(job: Any, job_id: int) -> str:
    array_job = _jint(_get(job, "array", "job_id"), "array.job_id") or 0
    task = _jint(_get(job, "array", "task_id"), "array.task_id")
    spec = _get(job, "array", "task")
    het_job = _jint(_get(job, "het", "job_id"), "het.job_id") or 0
    het_offset = _jint(_get(job, "het", "job_offset"), "het.job_offset")
    if array_job and task is not None and 0 <= task < _NO_VAL:
        return f"{array_job}_{task}"
    if array_job and isinstance(spec, str) and spec:
        return f"{array_job}_[{spec}]"
    if het_job and het_offset is not None and 0 <= het_offset < _NO_VAL:
        return f"{het_job}+{het_offset}"
    return str(job_id)


def _json_extra(job: Any) -> dict[str, str]:
    extra: dict[str, str] = {}
    for name, key in (
        ("QOS", "qos"),
        ("Group", "group"),
        ("NodeList", "nodes"),
        ("Constraints", "constraints"),
        ("WorkDir", "working_directory"),
        ("SubmitLine", "submit_line"),
    ):
        value = job.get(key)
        if isinstance(value, str):
            extra[name] = value
    eligible = _jint(_get(job, "time", "eligible"), "time.eligible")
    if eligible is not None:
        extra["Eligible"] = str(eligible) if eligible > 0 else ""
    nodes = _jint(job.get("allocation_nodes"), "allocation_nodes")
    if nodes is not None:
        extra["NNodes"] = str(nodes)
    if isinstance(job.get("reservation"), dict):
        reservation = job["reservation"].get("name")
        extra["Reservation"] = reservation if isinstance(reservation, str) else ""
    if isinstance(job.get("exit_code"), dict):
        code = _jint(_get(job, "exit_code", "return_code"), "exit_code.return_code") or 0
        signal = _jint(_get(job, "exit_code", "signal", "id"), "exit_code.signal.id") or 0
        extra["ExitCode"] = f"{code}:{signal}"
    return extra


def _record_from_json(job: Any, *, index: int, cluster: str) -> JobRecord:
    if not isinstance(job, dict):
        raise _Bad(f"{_json_snippet(job)} is not a job object")
    job_id = _jint(job.get("job_id"), "job_id")
    if job_id is None or job_id <= 0:
        raise _Bad(f"job_id {_json_snippet(job.get('job_id'))} is missing or not a job id")
    try:
        return _job_from_json(job, job_id, index=index, cluster=cluster)
    except _Bad as exc:
        raise _Bad(f"job {job_id}: {exc}") from exc


def _job_from_json(job: dict[str, Any], job_id: int, *, index: int, cluster: str) -> JobRecord:
    submit_at = _jtime(job, "submission")
    if submit_at is None:
        raise _Bad("time.submission is missing: the run cannot be identified")
    start_at = _jtime(job, "start")
    elapsed = _jint(_get(job, "time", "elapsed"), "time.elapsed")
    found = job.get("association")
    association: dict[str, Any] = found if isinstance(found, dict) else {}

    def text(key: str) -> str:
        return _jstr(job.get(key), key) or _jstr(association.get(key), f"association.{key}")

    return JobRecord(
        cluster=text("cluster") or cluster,
        job_id=_json_display_id(job, job_id),
        job_id_raw=str(job_id),
        submit_at=submit_at,
        start_at=start_at,
        end_at=_jtime(job, "end"),
        elapsed_s=_elapsed(elapsed, "time.elapsed", start_at),
        state=_json_state(job.get("state")),
        account=text("account"),
        partition=text("partition"),
        user=text("user"),
        tres=tres_from_json(_get(job, "tres", "allocated")),
        job_name=_jstr(job.get("name"), "name"),
        line=index,
        extra=_json_extra(job),
    )
