"""Reading sacct output: bytes in, JobRecord / Rejected values out (no I/O, no clock).

Accepted inputs (auto-detected, see DESIGN.md and the public fixtures' MANIFEST.md):

* ``sacct --json`` of Slurm 21.08 to 25.11 and slurmrestd ``/slurmdb`` job responses;
* parsable output, ``-p`` (trailing delimiter) or ``-P``, with a header line, in any field
  order, extra fields allowed, the delimiter being ``|#|`` (the live query), ``|`` or a tab;
* headerless parsable output when the caller passes the field list.

Per-record problems become a ``Rejected`` (never an exception); only input that cannot be
read at all raises ``InputError``. State names never decide anything here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from functools import lru_cache
from typing import Any, BinaryIO, Optional, TypeVar, Union

from .errors import InputError
from .models import JobRecord, ParseResult, Rejected, RunKey, Tres
from .sacct import CAPTURE_DELIMITER, LIVE_FIELDS

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: sacct --helpformat names (Slurm 15.08 to 25.11), to map headers case-insensitively.
KNOWN_FIELDS: tuple[str, ...] = (
    "Account", "AdminComment", "AllocCPUS", "AllocGRES", "AllocNodes", "AllocTRES", "AssocID",
    "AveCPU", "AveCPUFreq", "AveDiskRead", "AveDiskWrite", "AvePages", "AveRSS", "AveVMSize",
    "BlockID", "Cluster", "Comment", "Constraints", "ConsumedEnergy", "ConsumedEnergyRaw",
    "Container", "CPUTime", "CPUTimeRAW", "DBIndex", "DerivedExitCode", "Elapsed", "ElapsedRaw",
    "Eligible", "End", "ExitCode", "Extra", "FailedNode", "Flags", "GID", "Group", "JobID",
    "JobIDRaw", "JobName", "Layout", "Licenses", "MaxDiskRead", "MaxDiskReadNode",
    "MaxDiskReadTask", "MaxDiskWrite", "MaxDiskWriteNode", "MaxDiskWriteTask", "MaxPages",
    "MaxPagesNode", "MaxPagesTask", "MaxRSS", "MaxRSSNode", "MaxRSSTask", "MaxVMSize",
    "MaxVMSizeNode", "MaxVMSizeTask", "McsLabel", "MinCPU", "MinCPUNode", "MinCPUTask", "NCPUS",
    "NNodes", "NodeList", "NTasks", "Partition", "Planned", "PlannedCPU", "PlannedCPURAW",
    "Priority", "QOS", "QOSRAW", "Reason", "ReqCPUFreq", "ReqCPUFreqGov", "ReqCPUFreqMax",
    "ReqCPUFreqMin", "ReqCPUS", "ReqGRES", "ReqMem", "ReqNodes", "ReqTRES", "Reservation",
    "ReservationId", "Reserved", "ResvCPU", "ResvCPURAW", "Start", "State", "StdErr", "StdIn",
    "StdOut", "Submit", "SubmitLine", "Suspended", "SystemComment", "SystemCPU", "Timelimit",
    "TimelimitRaw", "TotalCPU", "TRESUsageInAve", "TRESUsageInMax", "TRESUsageInMaxNode",
    "TRESUsageInMaxTask", "TRESUsageInMin", "TRESUsageInMinNode", "TRESUsageInMinTask",
    "TRESUsageInTot", "TRESUsageOutAve", "TRESUsageOutMax", "TRESUsageOutMaxNode",
    "TRESUsageOutMaxTask", "TRESUsageOutMin", "TRESUsageOutMinNode", "TRESUsageOutMinTask",
    "TRESUsageOutTot", "UID", "User", "UserCPU", "WCKey", "WCKeyID", "WorkDir",
)  # fmt: skip
_CANONICAL = {name.lower(): name for name in KNOWN_FIELDS}

#: Fields users can fill with any text (``|``, newlines...). When one is the last column, a
#: record with too many delimiters is rejoined into it.
FREE_TEXT_FIELDS = frozenset(
    {"JobName", "SubmitLine", "WorkDir", "Comment", "AdminComment", "SystemComment", "Extra",
     "StdOut", "StdErr", "StdIn", "Constraints", "Container", "WCKey"}
)  # fmt: skip

#: Fields that become JobRecord attributes; every other column goes to ``extra``.
_CONSUMED = frozenset(
    {"Cluster", "JobID", "JobIDRaw", "Account", "Partition", "User", "Submit", "Start", "End",
     "ElapsedRaw", "State", "AllocTRES", "JobName"}
)  # fmt: skip

MAX_ELAPSED_S = 10 * 366 * 86400  # more than ten years of wall time is a corrupt record
_NO_VAL = 0xFFFFFFFE  # Slurm's "not set" marker for 32-bit counts
_SNIPPET = 200

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_UINT_RE = re.compile(r"[0-9]+")
_JOB_ID_RE = re.compile(
    r"(?P<base>[0-9]+)"
    r"(?:_(?P<task>[0-9]+)|_\[(?P<spec>[0-9,%:\-]+)\]|\+(?P<het>[0-9]+))?"
    r"(?:\.(?P<step>\S+))?"
)
_DURATION_RE = re.compile(r"(?:(?P<days>[0-9]+)-)?(?P<clock>[0-9]+(?::[0-9]+){0,2})(?:\.[0-9]+)?")
_ISO_RE = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})[T ]"
    r"(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?)?"
    r"(?P<off>Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_TRES_ITEM_RE = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_/:.\-]*)=(?P<value>.*)")
_MEM_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTPkmgtp]?)")
_MIB_PER_UNIT = {
    "K": Decimal(1) / Decimal(1024),
    "": Decimal(1),
    "M": Decimal(1),
    "G": Decimal(1024),
    "T": Decimal(1024) ** 2,
    "P": Decimal(1024) ** 3,
}
_NO_DURATION = frozenset({"UNLIMITED", "INVALID", "PARTITION_LIMIT"})
_NO_TIME = frozenset({"", "UNKNOWN", "NONE"})


class _Bad(Exception):
    """One record is malformed; the message names the field and the value."""


# --- field parsers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobId:
    """A parsed sacct JobID: ``123``, ``123_4``, ``123_[1-5%2]``, ``123+0``, ``123.batch``."""

    text: str
    base: int
    array_task: Optional[int] = None
    array_spec: Optional[str] = None  # the pending tasks of an array meta record, e.g. "1-5%2"
    het_offset: Optional[int] = None
    step: Optional[str] = None  # "batch", "extern", "0", ... for step records

    @property
    def is_step(self) -> bool:
        return self.step is not None

    @property
    def is_pending_array(self) -> bool:
        return self.array_spec is not None


def parse_job_id(text: str) -> JobId:
    """Parse a JobID or JobIDRaw value; ValueError when it is not one."""
    stripped = text.strip()
    if stripped.isdigit() and stripped.isascii():  # the common case: a plain job id
        return JobId(text=stripped, base=int(stripped))
    match = _JOB_ID_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"{text!r} is not a Slurm job id")
    task, het = match.group("task"), match.group("het")
    return JobId(
        text=stripped,
        base=int(match.group("base")),
        array_task=int(task) if task is not None else None,
        array_spec=match.group("spec"),
        het_offset=int(het) if het is not None else None,
        step=match.group("step"),
    )


def parse_duration(text: str) -> Optional[int]:
    """Seconds in a sacct duration (``[D-]HH:MM:SS``, ``MM:SS[.mmm]``, ``D-HH[:MM]``).

    ``UNLIMITED``, ``INVALID``, ``Partition_Limit`` and empty text give None; fractions of a
    second are dropped; anything else raises ValueError.
    """
    stripped = text.strip()
    if not stripped or stripped.upper() in _NO_DURATION:
        return None
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"{text!r} is not a duration")
    parts = [int(p) for p in match.group("clock").split(":")]
    has_fraction = "." in stripped
    if match.group("days") is not None:
        days = int(match.group("days"))
        if has_fraction and len(parts) != 3:
            raise ValueError(f"{text!r} is not a duration")
        hours, minutes, seconds = [*parts, 0, 0][:3]
        if hours >= 24:
            raise ValueError(f"{text!r} has {hours} hours after the days")
    else:
        if len(parts) == 1:
            raise ValueError(f"{text!r} is not a duration (a bare number has no unit)")
        days = 0
        hours, minutes, seconds = ([0, *parts] if len(parts) == 2 else parts)[:3]
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"{text!r} is not a duration (minutes or seconds over 59)")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _offset(text: str) -> tzinfo:
    if text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + (int(digits[2:]) if len(digits) > 2 else 0)
    return timezone(sign * timedelta(minutes=minutes))


def _localize(naive: datetime, tz: tzinfo) -> datetime:
    localize = getattr(tz, "localize", None)  # pytz zones need localize(), not replace()
    if callable(localize):
        aware: datetime = localize(naive, is_dst=True)
        return aware
    # fold=0: an ambiguous wall time (the hour repeated when DST ends) is taken as the FIRST
    # of the two instants (still in daylight saving time). sacct never prints a wall time that
    # DST skipped; how one is read then is up to the tzinfo implementation.
    return naive.replace(tzinfo=tz, fold=0)


def parse_time(text: str, tz: tzinfo = timezone.utc) -> Optional[datetime]:
    """A UTC-aware datetime from a sacct time.

    Accepts epoch seconds (``SLURM_TIME_FORMAT=%s``), ISO 8601 with an offset or ``Z``, and
    naive ISO 8601 (sacct's default), which is read as wall time in ``tz``. ``Unknown``,
    ``None``, ``0`` and empty text give None (not known yet); anything else raises ValueError.
    """
    stripped = text.strip()
    if (  # the common cases first: sacct's default naive ISO time, epoch seconds
        len(stripped) == 19
        and stripped[10] in "T "
        and stripped[4] == stripped[7] == "-"
        and stripped[13] == stripped[16] == ":"
    ):
        fast = _naive_iso(stripped)
        if fast is not None:
            if tz is timezone.utc:
                return fast.replace(tzinfo=timezone.utc)
            return _localize(fast, tz).astimezone(timezone.utc)
    if stripped.upper() in _NO_TIME:
        return None
    try:
        if stripped.isdigit() and stripped.isascii():
            seconds = int(stripped)
            if seconds == 0:
                return None  # epoch 0: not set
            return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
        match = _ISO_RE.fullmatch(stripped)
        if match is None:
            raise ValueError(f"{text!r} is not a time (expected epoch seconds or ISO 8601)")
        fraction = (match.group("f") or "").ljust(6, "0")
        naive = datetime(
            int(match.group("y")),
            int(match.group("mo")),
            int(match.group("d")),
            int(match.group("h")),
            int(match.group("mi")),
            int(match.group("s") or 0),
            int(fraction),
        )
        off = match.group("off")
        aware = naive.replace(tzinfo=_offset(off)) if off else _localize(naive, tz)
        return aware.astimezone(timezone.utc)
    except OverflowError as exc:
        raise ValueError(f"{text!r} is out of range") from exc


def _naive_iso(text: str) -> Optional[datetime]:
    """``YYYY-MM-DD[T ]HH:MM:SS`` (already checked for its separators) as a naive datetime;
    None when it is not one (the full parser then says why)."""
    digits = text[:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:]
    if not (digits.isdigit() and digits.isascii()):
        return None
    try:
        return datetime.fromisoformat(text)  # checked: ASCII digits, '-', 'T' or ' ', ':'
    except ValueError:
        return None


def parse_state(text: str) -> str:
    """The first word of a state, upper-cased: ``CANCELLED by 123`` -> ``CANCELLED``."""
    words = text.split()
    return words[0].upper() if words else ""


def _count(name: str, value: str) -> int:
    if not _UINT_RE.fullmatch(value) or len(value) > 18:
        raise ValueError(f"{name}={_short(value)} is not a plausible count")
    number = int(value)
    if number >= _NO_VAL:
        raise ValueError(f"{name}={value} is Slurm's 'no value' marker, not a count")
    return number


def parse_tres(text: str) -> Tres:
    """Allocated TRES from ``billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1``.

    Memory goes to MiB (``K`` = 1/1024 MiB). GPUs: the untyped ``gres/gpu`` count when present,
    else the sum of the typed ``gres/gpu:TYPE`` counts (never both). Other TRES are ignored.
    A malformed item raises ValueError.
    """
    return _parse_tres(text)


@lru_cache(maxsize=4096)  # allocations repeat: a few hundred shapes in a whole month
def _parse_tres(text: str) -> Tres:
    stripped = text.strip()
    if not stripped:
        return Tres()
    cpu = node = billing = typed_gpus = 0
    untyped_gpus: Optional[int] = None
    mem_mb = Decimal(0)
    seen: set[str] = set()
    for item in stripped.split(","):
        match = _TRES_ITEM_RE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"malformed TRES item {item!r} (expected name=value)")
        name, value = match.group("name").lower(), match.group("value").strip()
        if name in seen:
            raise ValueError(f"TRES {name} appears twice")
        seen.add(name)
        if name == "cpu":
            cpu = _count(name, value)
        elif name == "node":
            node = _count(name, value)
        elif name == "billing":
            billing = _count(name, value)
        elif name == "mem":
            mem = _MEM_RE.fullmatch(value)
            if mem is None:
                raise ValueError(f"mem={value!r} is not an amount of memory")
            mem_mb = Decimal(mem.group("num")) * _MIB_PER_UNIT[mem.group("unit").upper()]
        elif name == "gres/gpu":
            untyped_gpus = _count(name, value)
        elif name.startswith("gres/gpu:"):
            typed_gpus += _count(name, value)
    gpu = untyped_gpus if untyped_gpus is not None else typed_gpus
    return Tres(cpu=cpu, mem_mb=mem_mb, node=node, gpu=gpu, billing=billing)


def canonical_field(name: str) -> str:
    """sacct's spelling of a field name (``jobidraw`` -> ``JobIDRaw``; ``jobname%30`` too)."""
    bare = name.strip().split("%", 1)[0].strip()
    return _CANONICAL.get(bare.lower(), bare)


# --- entry point -----------------------------------------------------------------------------


def parse_sacct(
    data: bytes,
    *,
    cluster: str,
    fields: Optional[Sequence[str]] = None,
    tz: tzinfo = timezone.utc,
    source: str = "<input>",
) -> ParseResult:
    """Parse sacct output (JSON, or parsable with a header, or headerless with ``fields``).

    ``cluster`` is used when a record does not name its cluster; ``tz`` is the zone of naive
    times (sacct's local time); ``source`` names the input in errors. Raises InputError only
    when the input as a whole cannot be read.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return ParseResult(records=(), rejected=())
    if data.lstrip().startswith(b"{"):
        return _parse_json(data, cluster=cluster, source=source)
    if isinstance(fields, str):
        fields = fields.split(",")
    return _parse_parsable(data, cluster=cluster, fields=fields, tz=tz, source=source)


# --- parsable output -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    delimiter: str
    trailing: bool  # -p: every record ends with the delimiter

    @property
    def unique(self) -> bool:
        return len(set(self.names)) == len(self.names)


def _snippet(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _header_layout(line: str) -> Optional[_Layout]:
    """The layout a header line announces: our capture delimiter, ``|``, a tab, or any other
    delimiter (e.g. a random one, as the live query uses) found between the first two names."""
    first = _NAME_RE.match(line)
    guessed = []
    if first is not None:
        rest = line[first.end() :]
        guessed = [rest[:size] for size in range(1, min(len(rest), 64) + 1)]
    for delimiter in (CAPTURE_DELIMITER, "|", "\t", *guessed):
        if not delimiter.strip() and delimiter != "\t":
            continue
        cells = line.split(delimiter)
        trailing = len(cells) > 1 and cells[-1] == ""
        if trailing:
            cells = cells[:-1]
        names = [cell.strip() for cell in cells]
        if all(_NAME_RE.fullmatch(n) for n in names) and any(
            n.lower() in ("jobid", "jobidraw") for n in names
        ):
            return _Layout(tuple(canonical_field(n) for n in names), delimiter, trailing)
    return None


def _headerless_layout(body: bytes, names: tuple[str, ...]) -> _Layout:
    lines = [
        line.decode("utf-8", "replace").rstrip("\r")
        for line in body.split(b"\n", 21)[:20]
        if line.strip()
    ]
    first = lines[0] if lines else ""
    delimiter = next((d for d in (CAPTURE_DELIMITER, "|", "\t") if d in first), "|")
    ending = [line for line in lines if line.endswith(delimiter)]
    trailing = len(ending) * 2 > len(lines) and len(ending[0].split(delimiter)) >= len(names) + 1
    return _Layout(names, delimiter, trailing)


def _missing_columns(names: Sequence[str]) -> list[str]:
    have = set(names)
    wanted = [
        (("JobIDRaw", "JobID"), "JobIDRaw (or JobID)"),
        (("Submit",), "Submit"),
        (("Start",), "Start"),
        (("End",), "End"),
        (("ElapsedRaw", "Elapsed"), "ElapsedRaw (or Elapsed)"),
        (("AllocTRES", "AllocCPUS", "NCPUS"), "AllocTRES (or AllocCPUS/NCPUS)"),
    ]
    return [label for options, label in wanted if not have.intersection(options)]


def _split_records(body: bytes, layout: _Layout) -> Iterator[tuple[int, bytes, Optional[str]]]:
    """(offset in body, record bytes, problem) for each record, in order."""
    delimiter = layout.delimiter.encode()
    expected = len(layout.names)
    last_free = layout.names[-1] in FREE_TEXT_FIELDS
    if layout.trailing:
        terminator = delimiter + b"\n"
        if body.endswith(delimiter):
            body += b"\n"
        chunks: list[tuple[int, bytes]] = []
        start = 0
        while True:
            end = body.find(terminator, start)
            if end < 0:
                break
            chunks.append((start, body[start:end]))
            start = end + len(terminator)
        rest = body[start:]
        index = 0
        while index < len(chunks):
            offset, chunk = chunks[index]
            index += 1
            # A free-text last field starting with a newline (or "#|\n") ends the record
            # early; the next chunk then has no delimiter at all: glue it back.
            while (
                last_free
                and chunk.count(delimiter) < expected - 1
                and index < len(chunks)
                and delimiter not in chunks[index][1]
            ):
                chunk = chunk + terminator + chunks[index][1]
                index += 1
            if chunk.strip():
                yield offset, chunk, None
        if rest.strip():
            yield start, rest, f"truncated record: it does not end with {layout.delimiter!r}"
        return
    lines: list[tuple[int, bytes]] = []
    start = 0
    for line in body.split(b"\n"):
        lines.append((start, line))
        start += len(line) + 1
    while lines and not lines[-1][1].strip():
        lines.pop()
    pending: Optional[tuple[int, bytes]] = None
    for offset, line in lines:
        if pending is not None and last_free and delimiter not in line:
            # -P has no escaping: a line without any delimiter continues a job name.
            pending = (pending[0], pending[1] + b"\n" + line)
            continue
        if pending is not None:
            yield pending[0], pending[1], None
            pending = None
        if line.strip():
            pending = (offset, line)
    if pending is not None:
        yield pending[0], pending[1], None


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


def _row(text: str, layout: _Layout) -> dict[str, str]:
    expected = len(layout.names)
    cells = text.split(layout.delimiter)
    if len(cells) > expected and layout.names[-1] in FREE_TEXT_FIELDS:
        cells = [*cells[: expected - 1], layout.delimiter.join(cells[expected - 1 :])]
    if len(cells) != expected:
        raise _Bad(
            f"expected {expected} fields separated by {layout.delimiter!r} as in the header, "
            f"found {len(cells)} (a truncated line, or a delimiter/newline inside a value?)"
        )
    if layout.unique:
        return dict(zip(layout.names, cells))
    row: dict[str, str] = {}
    for name, cell in zip(layout.names, cells):
        row.setdefault(name, cell)  # a column named twice: the first one counts
    return row


def _field(row: Mapping[str, str], name: str, parser: Callable[..., _T], *args: Any) -> _T:
    value = row.get(name, "")
    try:
        return parser(value, *args)
    except ValueError as exc:
        detail = str(exc) if len(str(exc)) <= 300 else str(exc)[:300] + "..."
        raise _Bad(f"{name} {_short(value)}: {detail}") from exc


def _short(value: str, limit: int = 60) -> str:
    """``value`` quoted for a message, at most ``limit`` characters of it."""
    shown = value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
    return repr(shown)


def _elapsed(value: Optional[int], name: str, start_at: Optional[datetime]) -> int:
    if value is None:
        if start_at is None:
            return 0  # not started yet: nothing ran
        raise _Bad(f"{name} is empty although the run started")
    if value < 0:
        raise _Bad(f"{name} {value} is negative")
    if value > MAX_ELAPSED_S:
        raise _Bad(f"{name} {value} is more than ten years")
    return value


def _record_from_row(
    row: Mapping[str, str], *, line: int, cluster: str, tz: tzinfo
) -> Optional[JobRecord]:
    """The JobRecord of one allocation row, or None for a step row."""
    raw_id = row.get("JobIDRaw", "").strip()
    shown_id = row.get("JobID", "").strip()
    if not raw_id and not shown_id:
        raise _Bad("no job id: JobIDRaw and JobID are empty")
    step = False
    for name in ("JobID", "JobIDRaw"):  # both are checked, then a step is left out
        value = row.get(name, "").strip()
        if value and not (value.isdigit() and value.isascii()):  # else a plain job id
            step = _field(row, name, parse_job_id).is_step or step
    if step:
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


def _optional_count(value: str, name: str) -> int:
    stripped = value.strip()
    return _count(name, stripped) if stripped else 0


# --- the live query --------------------------------------------------------------------------


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
    line = 2
    while position < len(data):
        if data[position : position + 1].isspace() and not data[position:].strip():
            break  # only blanks are left (checked when a blank is seen: it stays linear)
        chunk, problem, next_position = _live_record(data, position, mark, len(fields))
        outcome = _read_record(chunk, layout, problem, line=line, cluster=cluster, tz=timezone.utc)
        steps += _keep(outcome, records, rejected)
        line += data.count(b"\n", position, next_position)
        position = next_position
    return _result(source, records, rejected, steps)


def _live_header(data: bytes, mark: bytes, fields: Sequence[str], source: str) -> int:
    """The length of the live query's header line; InputError when it is not the one asked
    for."""
    header = mark.join(f.encode() for f in fields) + mark + b"\n"
    if not data.startswith(header):
        raise InputError(
            f"{source}: the output does not start with the header of the query "
            f"({len(fields)} fields and the delimiter asked for): another program, a wrapper or "
            "a changed sacct answered"
        )
    return len(header)


def _live_record(
    data: bytes, position: int, mark: bytes, count: int
) -> tuple[bytes, Optional[str], int]:
    """(record, problem, where the next one starts) of the record at ``position``.

    A record is exactly ``count`` fields, each followed by the delimiter, then a newline. The
    delimiter cannot occur inside a value, so the ``count``-th one ends the record, whatever
    the last field (a job name) holds: newlines, a newline right after a delimiter, or text
    that looks like a record. Anything else is damage: the bytes up to the next delimiter +
    newline are rejected.
    """
    end = position
    for _ in range(count):
        found = data.find(mark, end)
        if found < 0:
            break
        end = found + len(mark)
    else:
        if data[end : end + 1] == b"\n":
            return data[position : end - len(mark)], None, end + 1
    terminator = mark + b"\n"
    stop = data.find(terminator, position)
    if stop < 0:
        return data[position:], "truncated record: it does not end with the delimiter", len(data)
    chunk = data[position:stop]
    return (
        chunk,
        f"has {chunk.count(mark) + 1} fields instead of {count}: sacct output was damaged",
        stop + len(terminator),
    )


# --- JSON (sacct --json, slurmrestd /slurmdb) ------------------------------------------------


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


def _json_snippet(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        text = "<unprintable>"
    return _snippet(text)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _jint(value: Any, what: str) -> Optional[int]:
    """An int from a plain number or a ``{set, infinite, number}`` object; None when unset."""
    if isinstance(value, dict):
        if value.get("set") is False or value.get("infinite") is True:
            return None
        value = value.get("number")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{what} is {_json_snippet(value)}, not an integer")
    return value


def _jstr(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"{what} is {_json_snippet(value)}, not a string")


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


def _json_tres(allocated: Any) -> Tres:
    if allocated is None:
        return Tres()
    if not isinstance(allocated, list):
        raise _Bad(f"tres.allocated is {_json_snippet(allocated)}, not a list")
    cpu = node = billing = typed_gpus = 0
    untyped_gpus: Optional[int] = None
    mem_mb = Decimal(0)
    for item in allocated:
        if not isinstance(item, dict):
            raise _Bad(f"tres.allocated item {_json_snippet(item)} is not an object")
        kind = _jstr(item.get("type"), "tres type").lower()
        name = _jstr(item.get("name"), "tres name").lower()
        count = _jint(item.get("count"), f"tres {kind} count")
        if count is None or count < 0 or count >= _NO_VAL:
            continue  # NO_VAL (e.g. energy -2)
        if kind == "cpu":
            cpu = count
        elif kind == "mem":
            mem_mb = Decimal(count)  # MB, as Slurm counts memory
        elif kind == "node":
            node = count
        elif kind == "billing":
            billing = count
        elif kind == "gres" and name == "gpu":
            untyped_gpus = count
        elif kind == "gres" and name.startswith("gpu:"):
            typed_gpus += count
    gpu = untyped_gpus if untyped_gpus is not None else typed_gpus
    return Tres(cpu=cpu, mem_mb=mem_mb, node=node, gpu=gpu, billing=billing)


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
        tres=_json_tres(_get(job, "tres", "allocated")),
        job_name=_jstr(job.get("name"), "name"),
        line=index,
        extra=_json_extra(job),
    )


# --- records with their steps, as rows (the cost report, slurm_tracker.costs) ----------------


@dataclass(frozen=True)
class Row:
    """One record of parsable output (an allocation or a step) as ``{field: text}``, framed
    exactly as the billing reader frames it. ``problem`` is set, and ``cells`` empty, when the
    record is damaged: the caller counts it as rejected."""

    line: int
    text: str
    cells: Mapping[str, str]
    problem: Optional[str] = None


def _framed_row(raw: bytes, layout: _Layout, problem: Optional[str], line: int) -> Row:
    text = raw.decode("utf-8", "replace")
    if problem is not None:
        return Row(line, _snippet(text), {}, problem)
    try:
        cells = _row(text, layout)
    except _Bad as exc:
        return Row(line, _snippet(text), {}, str(exc))
    bad = [n for n, v in cells.items() if "\ufffd" in v and n not in FREE_TEXT_FIELDS]
    if bad:
        return Row(line, _snippet(text), {}, f"field {bad[0]} is not valid UTF-8")
    return Row(line, _snippet(text), cells)


def live_rows(data: bytes, *, delimiter: str, fields: Sequence[str], source: str) -> Iterator[Row]:
    """The records of a live query (allocations and steps), framed as :func:`parse_live`
    frames them: exact header, exactly ``len(fields)`` delimiters per record."""
    mark = delimiter.encode()
    header = mark.join(f.encode() for f in fields) + mark + b"\n"
    if not data.startswith(header):
        raise InputError(
            f"{source}: the output does not start with the header of the query "
            f"({len(fields)} fields and the delimiter asked for): another program, a wrapper or "
            "a changed sacct answered"
        )
    layout = _Layout(tuple(fields), delimiter, trailing=True)
    line = 2
    position = len(header)
    while position < len(data):
        if data[position : position + 1].isspace() and not data[position:].strip():
            break
        chunk, problem, next_position = _live_record(data, position, mark, len(fields))
        yield _framed_row(chunk, layout, problem, line)
        line += data.count(b"\n", position, next_position)
        position = next_position


def saved_rows(
    data: bytes, *, source: str, fields: Optional[Sequence[str]] = None
) -> Iterator[Row]:
    """The records of saved parsable output with a header (or headerless with ``fields``),
    steps included. Raises InputError when the input as a whole cannot be read."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r\n" in data[: data.find(b"\n") + 1 or len(data)]:
        data = data.replace(b"\r\n", b"\n")
    if not data.strip():
        return
    start = len(data) - len(data.lstrip(b"\n"))
    end = data.find(b"\n", start)
    line = data[start : end if end >= 0 else len(data)]
    try:
        layout = _header_layout(line.decode("utf-8"))
    except UnicodeDecodeError:
        layout = None
    line_no = data.count(b"\n", 0, start) + 1
    if layout is not None:
        body_start, line_no = (end + 1 if end >= 0 else len(data)), line_no + 1
    elif fields:
        body_start = start
        layout = _headerless_layout(data[start:], tuple(canonical_field(f) for f in fields))
    else:
        raise InputError(
            f"{source}:{line_no}: the first line is not a sacct header (no JobID or JobIDRaw "
            "column name found): save sacct output with its header line"
        )
    missing = _missing_columns(layout.names)
    if missing:
        raise InputError(f"{source}: the sacct output lacks the column(s) {', '.join(missing)}")
    body = data[body_start:]
    counted_to = 0
    for offset, raw, problem in _split_records(body, layout):
        line_no += body.count(b"\n", counted_to, offset)
        counted_to = offset
        yield _framed_row(raw, layout, problem, line_no)


def record_of_row(row: Row, *, cluster: str, tz: tzinfo) -> Union[JobRecord, Rejected, None]:
    """The JobRecord of an allocation row, None for a step row, or a Rejected; never raises."""
    if row.problem is not None:
        return Rejected(row.line, row.problem, row.text)
    try:
        return _record_from_row(row.cells, line=row.line, cluster=cluster, tz=tz)
    except _Bad as exc:
        reason = str(exc)
    except Exception as exc:  # a corrupt record must never stop the run
        reason = f"cannot be read ({type(exc).__name__}: {_snippet(str(exc))})"
    job_id, run = _row_identity(row.cells, cluster, tz)
    return Rejected(row.line, reason, row.text, job_id=job_id, run=run)


# --- streaming: records one by one, in bounded memory ----------------------------------------

#: Bytes read at a time from a saved capture.
BLOCK_BYTES = 1 << 20

Item = Union[JobRecord, Rejected, None]  # a record, a refused record, or a step record (None)


#: One record of parsable output as framed by the reader, not parsed yet: (its first line,
#: its bytes, why it cannot be read or None).
Framed = tuple[int, bytes, Optional[str]]


class RecordStream:
    """sacct output read record by record, as often as needed (the planner reads it twice: once
    for duplicate records of a run, once to plan), holding a bounded part of it at a time.

    ``framed()`` gives the records as framed, ``read()`` parses one, exactly as
    :func:`parse_sacct` / :func:`parse_live` do, in the same order and with the same line
    numbers; ``identity()`` gives a cheap key that is equal for every record of one run.
    """

    source: str

    def framed(self) -> Iterator[Framed]:
        raise NotImplementedError

    def read(self, framed: Framed) -> Item:
        raise NotImplementedError

    def identity(self, framed: Framed) -> Optional[tuple[str, str]]:
        """(cluster, JobIDRaw) as the record's RunKey will hold them, read without parsing the
        record; None when the record will not be a JobRecord anyway."""
        raise NotImplementedError

    def items(self) -> Iterator[Item]:
        read = self.read
        for framed in self.framed():
            yield read(framed)


class _ParsableStream(RecordStream):
    def __init__(self, layout: _Layout, cluster: str, tz: tzinfo, source: str) -> None:
        self.layout = layout
        self.cluster = cluster
        self.tz = tz
        self.source = source
        names = layout.names
        self._expected = len(names)
        self._where = {name: names.index(name) for name in ("Cluster", "JobIDRaw", "JobID")
                       if name in names}  # fmt: skip

    def read(self, framed: Framed) -> Item:
        line, raw, problem = framed
        return _read_record(raw, self.layout, problem, line=line, cluster=self.cluster, tz=self.tz)

    def identity(self, framed: Framed) -> Optional[tuple[str, str]]:
        if framed[2] is not None:
            return None
        text = framed[1].decode("utf-8", "replace")
        cells = text.split(self.layout.delimiter, self._expected - 1)
        if len(cells) != self._expected:
            return None
        where = self._where
        cluster = cells[where["Cluster"]].strip() if "Cluster" in where else ""
        raw = cells[where["JobIDRaw"]].strip() if "JobIDRaw" in where else ""
        shown = cells[where["JobID"]].strip() if "JobID" in where else ""
        return (cluster or self.cluster, raw or shown)


class _LiveStream(_ParsableStream):
    """The live query's output (held in memory by the caller), framed as parse_live frames it."""

    def __init__(self, data: bytes, mark: bytes, header: int, fields: Sequence[str],
                 cluster: str, source: str) -> None:  # fmt: skip
        super().__init__(_Layout(tuple(fields), mark.decode(), True), cluster, timezone.utc, source)
        self._data = data
        self._mark = mark
        self._header = header

    def framed(self) -> Iterator[Framed]:
        data, mark, count = self._data, self._mark, self._expected
        line = 2
        position = self._header
        while position < len(data):
            if data[position : position + 1].isspace() and not data[position:].strip():
                break
            chunk, problem, next_position = _live_record(data, position, mark, count)
            yield line, chunk, problem
            line += data.count(b"\n", position, next_position)
            position = next_position


class _SavedStream(_ParsableStream):
    """A saved capture (parsable output), read from its file block by block.

    The body is cut into blocks only where no record can span the cut: before a segment
    (up to the next newline, or delimiter + newline for ``-p``) that holds the delimiter and
    follows another such segment. A segment without the delimiter may continue the job name of
    the record before it (``-P`` has no escaping), and a blank line before a record may too;
    neither is ever at a cut, so each block reads exactly as the whole body would.
    """

    def __init__(self, opener: Callable[[], BinaryIO], *, skip: int, crlf: bool,
                 first_line: int, layout: _Layout, cluster: str, tz: tzinfo,
                 source: str) -> None:  # fmt: skip
        super().__init__(layout, cluster, tz, source)
        self._opener = opener
        self._skip = skip  # bytes before the body (BOM, blank lines, header), CRLF undone
        self._crlf = crlf
        self._first_line = first_line

    def _chunks(self) -> Iterator[bytes]:
        """The body, CRLF undone when the file uses it (as parse_sacct does)."""
        with self._opener() as handle:
            first = True
            carry = b""
            skip = self._skip
            while True:
                block = handle.read(BLOCK_BYTES)
                if first:
                    first = False
                    if block.startswith(b"\xef\xbb\xbf"):
                        block = block[3:]
                if not block:
                    break
                if self._crlf:
                    block = carry + block
                    carry = b""
                    if block.endswith(b"\r"):  # its \n may start the next block
                        block, carry = block[:-1], b"\r"
                    block = block.replace(b"\r\n", b"\n")
                if skip:
                    taken = min(skip, len(block))
                    block, skip = block[taken:], skip - taken
                if block:
                    yield block
            if carry:
                yield carry

    def framed(self) -> Iterator[Framed]:
        layout = self.layout
        delimiter = layout.delimiter.encode()
        separator = delimiter + b"\n" if layout.trailing else b"\n"
        line_no = self._first_line
        buffer = b""
        for piece in self._chunks():
            buffer += piece
            cut = _safe_cut(buffer, separator, delimiter)
            if cut:
                block, buffer = buffer[:cut], buffer[cut:]
                yield from _framed_block(block, layout, line_no)
                line_no += block.count(b"\n")
        yield from _framed_block(buffer, layout, line_no)


def _framed_block(block: bytes, layout: _Layout, line_no: int) -> Iterator[Framed]:
    counted_to = 0
    for offset, raw, problem in _split_records(block, layout):
        line_no += block.count(b"\n", counted_to, offset)
        counted_to = offset
        yield line_no, raw, problem


def _safe_cut(buffer: bytes, separator: bytes, delimiter: bytes) -> int:
    """Where ``buffer`` may be cut between two records (see _SavedStream), or 0: the start of
    a complete segment holding the delimiter, right after another one (or after the start of
    the buffer, itself such a cut)."""
    size = len(separator)
    end = buffer.rfind(separator)  # the end of the last complete segment
    start = buffer.rfind(separator, 0, end) if end >= 0 else -1
    while start >= 0:
        before = buffer.rfind(separator, 0, start)
        previous = before + size if before >= 0 else 0
        if buffer.find(delimiter, start + size, end) >= 0 and (
            buffer.find(delimiter, previous, start) >= 0
        ):
            return start + size
        end, start = start, before
    return 0


class _WholeStream(RecordStream):
    """Input read whole (JSON, or parsable output too odd to read in blocks): its parse result."""

    def __init__(self, parsed: ParseResult, source: str) -> None:
        self.parsed = parsed
        self.source = source
        self._items: list[Item] = [*parsed.rejected, *parsed.records]
        self._items += [None] * parsed.steps_ignored

    def framed(self) -> Iterator[Framed]:
        return ((i, b"", None) for i in range(len(self._items)))

    def read(self, framed: Framed) -> Item:
        return self._items[framed[0]]

    def identity(self, framed: Framed) -> Optional[tuple[str, str]]:
        item = self._items[framed[0]]
        return (item.cluster, item.job_id_raw) if isinstance(item, JobRecord) else None


def live_stream(
    data: bytes, *, delimiter: str, fields: Sequence[str], cluster: str, source: str
) -> RecordStream:
    """The records of the live query's output, as :func:`parse_live` reads them (the same
    InputError when the header is not the one asked for)."""
    mark = delimiter.encode()
    header = _live_header(data, mark, fields, source)
    return _LiveStream(data, mark, header, fields, cluster, source)


def saved_stream(
    opener: Callable[[], BinaryIO],
    *,
    cluster: str,
    fields: Optional[Sequence[str]] = None,
    tz: tzinfo = timezone.utc,
    source: str = "<input>",
) -> RecordStream:
    """The records of a saved capture, as :func:`parse_sacct` reads them, from a file that
    ``opener`` opens (once per pass). Parsable output is read block by block; JSON (and
    parsable output whose first lines are not found in its first blocks) is read whole."""
    if isinstance(fields, str):
        fields = fields.split(",")
    head = b""
    with opener() as handle:
        while head.count(b"\n") < 64 and len(head) < 64 * BLOCK_BYTES:
            more = handle.read(BLOCK_BYTES)
            if not more:
                break
            head += more
        ended = not handle.read(1)
    layout = None if ended else _stream_layout(head, fields)
    if layout is None:
        whole = head
        if not ended:
            with opener() as handle:
                whole = handle.read()
        return _WholeStream(
            parse_sacct(whole, cluster=cluster, fields=fields, tz=tz, source=source), source
        )
    found, skip, crlf, first_line = layout
    return _SavedStream(
        opener,
        skip=skip,
        crlf=crlf,
        first_line=first_line,
        layout=found,
        cluster=cluster,
        tz=tz,
        source=source,
    )


def _stream_layout(
    head: bytes, fields: Optional[Sequence[str]]
) -> Optional[tuple[_Layout, int, bool, int]]:
    """How to read the body of a large parsable capture whose first bytes are ``head``: (its
    layout, bytes before the body once CRLF is undone, CRLF, the body's first line number);
    None when it must be read whole (JSON, or no header line and enough body lines in head).
    The checks that refuse an input (InputError) are left to parse_sacct on the head."""
    data = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    if not data.strip() or data.lstrip().startswith(b"{"):
        return None
    crlf = b"\r\n" in data[: data.find(b"\n") + 1 or len(data)]
    if crlf:
        data = data.replace(b"\r\n", b"\n")
    start = 0
    while True:  # blank lines before the header, as _parse_parsable skips them
        end = data.find(b"\n", start)
        if end < 0:
            return None
        if data[start:end].strip():
            break
        start = end + 1
    first_line_no = data.count(b"\n", 0, start) + 1
    try:
        layout = _header_layout(data[start:end].decode("utf-8"))
    except UnicodeDecodeError:
        layout = None
    if layout is not None:
        skip, first_line = end + 1, first_line_no + 1
    elif fields:
        body = data[start:]
        if body.count(b"\n") < 22:
            return None
        layout = _headerless_layout(body, tuple(canonical_field(f) for f in fields))
        skip, first_line = start, first_line_no
    else:
        return None  # parse_sacct says why
    if _missing_columns(layout.names):
        return None  # parse_sacct says what is missing
    return layout, skip, crlf, first_line
