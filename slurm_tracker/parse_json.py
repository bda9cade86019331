"""``sacct --json`` (Slurm 21.08 to 25.11) and slurmrestd ``/slurmdb`` job responses to
records (part of the reader, :mod:`slurm_tracker.parse`): one JobRecord or Rejected per job.

The document is read job by job (:mod:`slurm_tracker.parse_json_stream`), never as one tree:
memory is bounded by the largest job, not the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Union

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
from .parse_json_stream import Event, NotJson, blocks_of, events
from .parse_rows import _result
from .parse_tres import tres_from_json

logger = logging.getLogger("slurm_tracker.parse")  # the reader's one logger, whichever module


#: Bytes of an in-memory document decoded at a time.
_BLOCK_BYTES = 1 << 20


def _parse_json(data: bytes, *, cluster: str, source: str) -> ParseResult:
    """The records of a whole ``sacct --json`` document, as :class:`JsonJobs` reads them."""
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    steps = index = 0
    document = _Document(source)
    for kind, _key, value in document.walk(lambda: blocks_of(data, _BLOCK_BYTES)):
        if kind == "jobs":  # json.loads keeps the last "jobs" member: start again
            records, rejected, steps, index = [], [], 0, 0
        elif kind == "job":
            index += 1
            steps += job_steps(value)
            item = job_item(value, index=index, cluster=cluster)
            if isinstance(item, JobRecord):
                records.append(item)
            else:
                rejected.append(item)
    document.check()
    return _result(source, records, rejected, steps)


class JsonJobs:
    """The jobs of a ``sacct --json`` document (or a slurmrestd ``/slurmdb`` jobs response)
    read block by block, in bounded memory (parse_json_stream), as often as needed.

    ``blocks`` gives the document's bytes in blocks, from its start, once per pass. The whole
    document is checked first: InputError, as :func:`_parse_json` raises it, when it is not
    valid JSON or has no "jobs" list. :meth:`jobs` then gives the elements of the list that
    ``json.loads`` keeps (the last "jobs" member).
    """

    def __init__(self, blocks: Callable[[], Iterator[bytes]], source: str) -> None:
        self._blocks = blocks
        self._document = _Document(source)
        for _event in self._document.walk(blocks):
            pass
        self._document.check()
        self._array = self._document.jobs_array

    def jobs(self) -> Iterator[Any]:
        arrays = 0
        for kind, _key, value in self._document.walk(self._blocks):
            if kind == "jobs":
                arrays += 1
            elif kind == "job" and arrays == self._array:
                yield value


class _Document:
    """A walk of the document (parse_json_stream.events) with the errors of _parse_json, and
    what the check needs: which "jobs" member is the last, and the last "errors" member."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.jobs_array: Optional[int] = None  # the last "jobs" member: its array's number
        self.errors: Any = None

    def walk(self, blocks: Callable[[], Iterator[bytes]]) -> Iterator[Event]:
        arrays = 0
        self.jobs_array, self.errors = None, None
        try:
            for event in events(blocks()):
                kind, key, value = event
                if kind == "jobs":
                    arrays += 1
                    self.jobs_array = arrays
                elif key == "jobs":
                    self.jobs_array = None  # not a list
                elif key == "errors":
                    self.errors = value
                yield event
        except NotJson as exc:
            raise InputError(
                f"{self.source}: starts with '{{' but is not valid JSON ({exc}); expected the "
                "output of sacct --json or a slurmrestd /slurmdb jobs response"
            ) from exc

    def check(self) -> None:
        """After a walk: InputError without a "jobs" list; the errors the document reports
        logged."""
        errors = self.errors
        if self.jobs_array is None:
            detail = f" (its errors: {_snippet(json.dumps(errors))})" if errors else ""
            raise InputError(
                f'{self.source}: JSON without a "jobs" list{detail}; expected the output of '
                "sacct --json or a slurmrestd /slurmdb jobs response"
            )
        if errors:
            logger.warning("%s: the JSON reports errors: %s", self.source, _json_snippet(errors))


def job_steps(job: Any) -> int:
    """How many step records a JSON job holds (counted as ignored, as parsable steps are)."""
    if isinstance(job, dict) and isinstance(job.get("steps"), list):
        return len(job["steps"])
    return 0


def job_item(job: Any, *, index: int, cluster: str) -> Union[JobRecord, Rejected]:
    """The JobRecord of the ``index``-th job (from 1), or its Rejected; never raises."""
    try:
        return _record_from_json(job, index=index, cluster=cluster)
    except Exception as exc:  # a corrupt record must never stop the run
        reason = str(exc) if isinstance(exc, _Bad) else f"{type(exc).__name__}: {exc}"
        job_id, run = _json_identity(job, cluster)
        return Rejected(
            index,
            f"job #{index}: {_snippet(reason)}",
            _json_snippet(job),
            job_id=job_id,
            run=run,
        )


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
