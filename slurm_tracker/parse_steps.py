"""Records with their steps, as rows of cells, for the cost report (:mod:`slurm_tracker.costs`;
part of the reader, :mod:`slurm_tracker.parse`). The billing reader ignores steps; the report
reads them, framed exactly as the billing reader frames records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from typing import Optional, Union

from .errors import InputError
from .models import JobRecord, Rejected
from .parse_fields import _Bad, _snippet
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
from .parse_rows import _record_from_row, _row_identity
from .sacct_format import FREE_TEXT_FIELDS, canonical_field


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
    position = _live_header(data, mark, fields, source)
    layout = _Layout(tuple(fields), delimiter, trailing=True)
    for line, chunk, problem in _live_framed(data, position, mark, len(fields)):
        yield _framed_row(chunk, layout, problem, line)


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
