"""Reading sacct output: bytes in, JobRecord / Rejected values out (no I/O, no clock).

Accepted inputs (auto-detected, see DESIGN.md and the public fixtures' MANIFEST.md):

* ``sacct --json`` of Slurm 21.08 to 25.11 and slurmrestd ``/slurmdb`` job responses;
* parsable output, ``-p`` (trailing delimiter) or ``-P``, with a header line, in any field
  order, extra fields allowed, the delimiter being ``|#|`` (the live query), ``|`` or a tab;
* headerless parsable output when the caller passes the field list.

Per-record problems become a ``Rejected`` (never an exception); only input that cannot be
read at all raises ``InputError``. State names never decide anything here.

This module is the reader's entry point (:func:`parse_sacct`, :func:`parse_live`, and the
streaming readers :func:`saved_stream` / :func:`live_stream`); the rest of the reader is in:

* :mod:`slurm_tracker.parse_fields`: single values (job ids, durations, times, states, counts);
* :mod:`slurm_tracker.parse_tres`: the one TRES decoder, for the text and the JSON forms;
* :mod:`slurm_tracker.parse_framing`: layouts and record framing of parsable output;
* :mod:`slurm_tracker.parse_rows`: parsable records to JobRecords, the whole-input readers;
* :mod:`slurm_tracker.parse_json`: ``sacct --json``;
* :mod:`slurm_tracker.parse_steps`: records with their steps, as rows (the cost report);
* :mod:`slurm_tracker.sacct_format`: the field names and delimiters (shared with sacct.py).

Their public names are re-exported here on purpose: callers (pipeline, costs, tests) import
them from ``slurm_tracker.parse``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timezone, tzinfo
from typing import BinaryIO, Callable, Optional, Union

from .models import JobRecord, ParseResult, Rejected
from .parse_fields import (
    MAX_ELAPSED_S,
    JobId,
    parse_duration,
    parse_job_id,
    parse_state,
    parse_time,
)
from .parse_framing import (
    Framed,
    _header_layout,
    _headerless_layout,
    _Layout,
    _live_framed,
    _live_header,
    _missing_columns,
    _split_records,
)
from .parse_json import _parse_json
from .parse_rows import _parse_parsable, _read_record, parse_live
from .parse_steps import Row, live_rows, record_of_row, saved_rows
from .parse_tres import decode_tres, parse_tres, tres_from_json
from .sacct_format import FREE_TEXT_FIELDS, KNOWN_FIELDS, canonical_field

__all__ = [
    "BLOCK_BYTES",
    "FREE_TEXT_FIELDS",
    "KNOWN_FIELDS",
    "MAX_ELAPSED_S",
    "Framed",
    "Item",
    "JobId",
    "RecordStream",
    "Row",
    "canonical_field",
    "decode_tres",
    "live_rows",
    "live_stream",
    "parse_duration",
    "parse_job_id",
    "parse_live",
    "parse_sacct",
    "parse_state",
    "parse_time",
    "parse_tres",
    "record_of_row",
    "saved_rows",
    "saved_stream",
    "tres_from_json",
]


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


# --- streaming: records one by one, in bounded memory ----------------------------------------

#: Bytes read at a time from a saved capture.
BLOCK_BYTES = 1 << 20

Item = Union[JobRecord, Rejected, None]  # a record, a refused record, or a step record (None)


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
        return _live_framed(self._data, self._header, self._mark, self._expected)


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
