"""Parsable sacct output to records (part of the reader, :mod:`slurm_tracker.parse`): one
framed record to a JobRecord, None (a step) or a Rejected, and the whole-input readers of saved
captures (with a header, or headerless with a field list) and of the live query.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timezone, tzinfo
from typing import Any, Optional, TypeVar, Union

from .errors import InputError
from .models import JobRecord, ParseResult, Rejected, RunKey, Tres
from .parse_fields import (
    _Bad,
    _elapsed,
    _optional_count,
    _short,
    _snippet,
    parse_duration,
    parse_job_id,
    parse_state,
    parse_time,
)
from .parse_framing import (
    _header_layout,
    _headerless_layout,
    _Layout,
    _live_framed,
    _live_header,
    _missing_columns,
    _row,
    _split_records,
)
from .parse_tres import parse_tres
from .sacct_format import CAPTURE_DELIMITER, FREE_TEXT_FIELDS, LIVE_FIELDS, canonical_field

logger = logging.getLogger("slurm_tracker.parse")  # the reader's one logger, whichever module

_T = TypeVar("_T")

#: Fields that become JobRecord attributes; every other column goes to ``extra``.
_CONSUMED = frozenset(
    {"Cluster", "JobID", "JobIDRaw", "Account", "Partition", "User", "Submit", "Start", "End",
     "ElapsedRaw", "State", "AllocTRES", "JobName"}
)  # fmt: skip


def _parse_parsable(
    data: bytes,
    *,
    cluster: str,
    fields: Optional[Sequence[str]],
    tz: tzinfo,
    source: str,
) -> ParseResult:
    if b"\r\n" in data[: data.find(b"\n") + 1 or len(data)]:
        data = data.replace(b"\r\n", b"\n")
    start = 0
    while True:  # skip blank lines before the header
        end = data.find(b"\n", start)
        line = data[start : end if end >= 0 else len(data)]
        if line.strip() or end < 0:
            break
        start = end + 1
    first_line_no = data.count(b"\n", 0, start) + 1
    try:
        layout = _header_layout(line.decode("utf-8"))
    except UnicodeDecodeError:
        layout = None
    if layout is not None:
        body_start = end + 1 if end >= 0 else len(data)
        body_line_no = first_line_no + 1
    elif fields:
        names = tuple(canonical_field(f) for f in fields)
        body_start = start
        body_line_no = first_line_no
        layout = _headerless_layout(data[body_start:], names)
    else:
        raise InputError(
            f"{source}:{first_line_no}: the first line is not a sacct header (no JobID or "
            "JobIDRaw column name found). Saved sacct output needs its header line; for a file "
            "made with --noheader, pass its field list, e.g. "
            "--sacct-fields JobID,JobIDRaw,Cluster,Account,Partition,User,Submit,Start,End,"
            "ElapsedRaw,State,AllocTRES,JobName"
        )
    missing = _missing_columns(layout.names)
    if missing:
        raise InputError(
            f"{source}: the sacct output lacks the column(s) {', '.join(missing)}, which "
            "billing needs. Save it with: sacct --allusers --allocations --duplicates --parsable "
            f"--delimiter='{CAPTURE_DELIMITER}' --format={','.join(LIVE_FIELDS)} "
            "(or use sacct --json)"
        )
    body = data[body_start:]
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    steps = 0
    line_no, counted_to = body_line_no, 0
    for offset, raw, problem in _split_records(body, layout):
        line_no += body.count(b"\n", counted_to, offset)
        counted_to = offset
        outcome = _read_record(raw, layout, problem, line=line_no, cluster=cluster, tz=tz)
        steps += _keep(outcome, records, rejected)
    return _result(source, records, rejected, steps)


def parse_live(
    data: bytes, *, delimiter: str, fields: Sequence[str], cluster: str, source: str
) -> ParseResult:
    """Parse the output of the live query (sacct.build_command with ``delimiter``, ``fields``).

    Strict, because the delimiter is unpredictable (see sacct.new_delimiter): the first line
    must be exactly the header asked for, every record ends with the delimiter and a newline and
    has exactly ``len(fields)`` fields. A record that does not is rejected (quarantined), never
    repaired. Raises InputError when the header is not the one asked for.
    """
    mark = delimiter.encode()
    position = _live_header(data, mark, fields, source)
    layout = _Layout(tuple(fields), delimiter, trailing=True)
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    steps = 0
    for line, chunk, problem in _live_framed(data, position, mark, len(fields)):
        outcome = _read_record(chunk, layout, problem, line=line, cluster=cluster, tz=timezone.utc)
        steps += _keep(outcome, records, rejected)
    return _result(source, records, rejected, steps)


def _keep(
    outcome: Union[JobRecord, Rejected, None], records: list[JobRecord], rejected: list[Rejected]
) -> int:
    """Put a record's outcome in its list; 1 for a step record (counted, not kept), else 0."""
    if isinstance(outcome, Rejected):
        rejected.append(outcome)
    elif outcome is None:
        return 1
    else:
        records.append(outcome)
    return 0


def _read_record(
    raw: bytes,
    layout: _Layout,
    problem: Optional[str],
    *,
    line: int,
    cluster: str,
    tz: tzinfo,
) -> Union[JobRecord, Rejected, None]:
    """One parsable record: a JobRecord, None for a step, or a Rejected; never raises.

    Free-text fields (job names...) may hold any bytes: they are decoded leniently, so that a
    user cannot get a record rejected (and so not billed) by naming a job with bad UTF-8.
    """
    text = raw.decode("utf-8", "replace")
    if problem is not None:
        return Rejected(line, problem, _snippet(text))
    row: dict[str, str] = {}
    try:
        row = _row(text, layout)
        bad = (
            [
                name
                for name, value in row.items()
                if "\ufffd" in value and name not in FREE_TEXT_FIELDS
            ]
            if "\ufffd" in text
            else ()
        )
        if bad:
            raise _Bad(f"field {bad[0]} is not valid UTF-8")
        return _record_from_row(row, line=line, cluster=cluster, tz=tz)
    except _Bad as exc:
        reason = str(exc)
    except Exception as exc:  # a corrupt record must never stop the run
        logger.debug("line %d: unexpected failure reading a record", line, exc_info=True)
        reason = f"cannot be read ({type(exc).__name__}: {_snippet(str(exc))})"
    job_id, run = _row_identity(row, cluster, tz)
    return Rejected(line, reason, _snippet(text), job_id=job_id, run=run)


def _row_identity(row: Mapping[str, str], cluster: str, tz: tzinfo) -> tuple[str, Optional[RunKey]]:
    """The job id and run of a row, as far as they can be read (for the quarantine)."""
    raw_id = row.get("JobIDRaw", "").strip() or row.get("JobID", "").strip()
    job_id = row.get("JobID", "").strip() or raw_id
    try:
        parse_job_id(raw_id)
        submit_at = parse_time(row.get("Submit", ""), tz)
    except (ValueError, OverflowError):
        return _snippet(job_id), None
    if submit_at is None:
        return _snippet(job_id), None
    return job_id, RunKey(row.get("Cluster", "").strip() or cluster, raw_id, submit_at)


def _result(
    source: str, records: list[JobRecord], rejected: list[Rejected], steps: int
) -> ParseResult:
    logger.debug(
        "%s: %d records, %d rejected, %d steps ignored",
        source,
        len(records),
        len(rejected),
        steps,
    )
    return ParseResult(records=tuple(records), rejected=tuple(rejected), steps_ignored=steps)


def _field(row: Mapping[str, str], name: str, parser: Callable[..., _T], *args: Any) -> _T:
    value = row.get(name, "")
    try:
        return parser(value, *args)
    except ValueError as exc:
        detail = str(exc) if len(str(exc)) <= 300 else str(exc)[:300] + "..."
        raise _Bad(f"{name} {_short(value)}: {detail}") from exc


def _record_from_row(
    row: Mapping[str, str], *, line: int, cluster: str, tz: tzinfo
) -> Optional[JobRecord]:
    """The JobRecord of one allocation row, or None for a step row."""
    raw_id = row.get("JobIDRaw", "").strip()
    shown_id = row.get("JobID", "").strip()
    if not raw_id and not shown_id:
        raise _Bad("no job id: JobIDRaw and JobID are empty")
    steps: dict[str, bool] = {}  # both are checked, then a step is left out
    for name in ("JobID", "JobIDRaw"):
        value = row.get(name, "").strip()
        if value:  # a plain job id is no step; anything else is parsed
            plain = value.isdigit() and value.isascii()
            steps[name] = not plain and _field(row, name, parse_job_id).is_step
    if len(set(steps.values())) > 1:  # one says job, the other step: which one lies?
        raise _Bad(
            f"JobID {_short(shown_id)} and JobIDRaw {_short(raw_id)} disagree on whether "
            "this is a job or one of its steps"
        )
    if any(steps.values()):
        return None
    job_id = shown_id or raw_id
    try:
        return _job_from_row(row, job_id, raw_id or shown_id, line=line, cluster=cluster, tz=tz)
    except _Bad as exc:
        raise _Bad(f"job {job_id}: {exc}") from exc


def _job_from_row(
    row: Mapping[str, str], job_id: str, raw_id: str, *, line: int, cluster: str, tz: tzinfo
) -> JobRecord:
    submit_at = _field(row, "Submit", parse_time, tz)
    if submit_at is None:
        raise _Bad(f"Submit {row.get('Submit', '')!r} is missing: the run cannot be identified")
    start_at = _field(row, "Start", parse_time, tz)
    end_at = _field(row, "End", parse_time, tz)
    if "ElapsedRaw" in row:
        raw = row["ElapsedRaw"].strip()
        if (
            raw
            and not (raw.isdigit() and raw.isascii() and len(raw) <= 18)
            and not re.fullmatch(r"-?[0-9]{1,18}", raw)
        ):
            raise _Bad(f"ElapsedRaw {_short(raw)} is not a plausible number of seconds")
        elapsed_s = _elapsed(int(raw) if raw else None, "ElapsedRaw", start_at)
    else:
        elapsed_s = _elapsed(_field(row, "Elapsed", parse_duration), "Elapsed", start_at)
    if "AllocTRES" in row:
        tres = _field(row, "AllocTRES", parse_tres)
    else:  # old --format without AllocTRES: CPUs and nodes only
        cpus_field = "AllocCPUS" if "AllocCPUS" in row else "NCPUS"
        tres = Tres(
            cpu=_field(row, cpus_field, _optional_count, cpus_field),
            node=_field(row, "NNodes", _optional_count, "NNodes"),
        )
    return JobRecord(
        cluster=row.get("Cluster", "").strip() or cluster,
        job_id=job_id,
        job_id_raw=raw_id,
        submit_at=submit_at,
        start_at=start_at,
        end_at=end_at,
        elapsed_s=elapsed_s,
        state=parse_state(row.get("State", "")),
        account=row.get("Account", ""),
        partition=row.get("Partition", ""),
        user=row.get("User", ""),
        tres=tres,
        job_name=row.get("JobName", ""),
        line=line,
        extra=_Extra(row),
    )


class _Extra(Mapping[str, str]):
    """The fields of a row that are not JobRecord attributes (``JobRecord.extra``): a view of
    the row, made without copying it (most records never have it read)."""

    __slots__ = ("_row",)

    def __init__(self, row: Mapping[str, str]) -> None:
        self._row = row

    def __getitem__(self, name: str) -> str:
        if name in _CONSUMED:
            raise KeyError(name)
        return self._row[name]

    def __contains__(self, name: object) -> bool:
        return name not in _CONSUMED and name in self._row

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._row if name not in _CONSUMED)

    def __len__(self) -> int:
        return sum(1 for name in self._row if name not in _CONSUMED)

    def __repr__(self) -> str:
        return repr(dict(self))
