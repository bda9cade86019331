"""Reading sacct output as a stream (part of the reader, :mod:`slurm_tracker.parse`, which
re-exports these names): record by record, in bounded memory, as often as needed.

* a saved parsable capture: read from its file block by block, cut only where no record can
  span the cut (:class:`_SavedStream`);
* a saved ``sacct --json`` document: job by job (:class:`_JsonStream`, parse_json.JsonJobs);
* small or odd captures, read whole (:class:`_WholeStream`).

The live query's output is streamed by :mod:`slurm_tracker.parse_live_stream`, on the classes
and block reading here.

Every stream gives exactly the records, rejections and line numbers that reading the whole
input with parse_sacct / parse_live gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timezone, tzinfo
from itertools import repeat
from typing import Any, BinaryIO, Callable, Optional, Union

from .models import JobRecord, ParseResult, Rejected
from .parse_framing import (
    Framed,
    _header_layout,
    _headerless_layout,
    _Layout,
    _missing_columns,
    _split_records,
)
from .parse_json import JsonJobs, job_item, job_steps
from .parse_rows import _read_record
from .sacct_format import canonical_field

_BOM = b"\xef\xbb\xbf"

#: Bytes read at a time from a saved capture or a live query's spooled output.
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


def _blocks(handle: BinaryIO) -> Iterator[bytes]:
    """The bytes of ``handle`` from where it is, BLOCK_BYTES at a time (never an empty one)."""
    while True:
        block = handle.read(BLOCK_BYTES)
        if not block:
            return
        yield block


def _at_least(blocks: Iterator[bytes], size: int) -> bytes:
    """The first blocks, together at least ``size`` bytes (fewer at the end)."""
    data = b""
    while len(data) < size:
        block = next(blocks, b"")
        if not block:
            break
        data += block
    return data


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


class _JsonStream(RecordStream):
    """A saved ``sacct --json`` document, job by job (parse_json.JsonJobs, checked whole when
    opened): the records and rejections parse_sacct gives, in the document's order, each
    job's steps (counted as ignored) right after it."""

    def __init__(self, opener: Callable[[], BinaryIO], cluster: str, source: str) -> None:
        self.cluster = cluster
        self.source = source
        self._jobs = JsonJobs(lambda: _json_blocks(opener), source)
        self._job: tuple[int, Any] = (0, None)  # the job framed last, with its number
        self._item: tuple[int, Item] = (0, None)  # the item read last, with its number

    def framed(self) -> Iterator[Framed]:
        for number, job in enumerate(self._jobs.jobs(), 1):
            self._job = (number, job)
            yield number, b"", None

    def _job_at(self, number: int) -> Any:
        if self._job[0] != number:  # not the one framed last: find it again
            found = enumerate(self._jobs.jobs(), 1)
            self._job = next((n, job) for n, job in found if n == number)
        return self._job[1]

    def read(self, framed: Framed) -> Item:
        number = framed[0]
        if self._item[0] != number:
            job = self._job_at(number)
            self._item = (number, job_item(job, index=number, cluster=self.cluster))
        return self._item[1]

    def identity(self, framed: Framed) -> Optional[tuple[str, str]]:
        item = self.read(framed)
        return (item.cluster, item.job_id_raw) if isinstance(item, JobRecord) else None

    def items(self) -> Iterator[Item]:
        for framed in self.framed():
            yield self.read(framed)
            yield from repeat(None, job_steps(self._job[1]))


def _json_blocks(opener: Callable[[], BinaryIO]) -> Iterator[bytes]:
    """The bytes of a saved document after its UTF-8 byte order mark (parse_sacct drops it)."""
    with opener() as handle:
        blocks = _blocks(handle)
        first = _at_least(blocks, len(_BOM))
        first = first[len(_BOM) :] if first.startswith(_BOM) else first
        if first:
            yield first
        yield from blocks


def saved_stream(
    opener: Callable[[], BinaryIO],
    *,
    cluster: str,
    fields: Optional[Sequence[str]] = None,
    tz: tzinfo = timezone.utc,
    source: str = "<input>",
) -> RecordStream:
    """The records of a saved capture, as :func:`parse_sacct` reads them, from a file that
    ``opener`` opens (once per pass). Parsable output is read block by block, JSON job by job;
    parsable output whose first lines are not found in its first blocks is read whole."""
    if isinstance(fields, str):
        fields = fields.split(",")
    head = first = b""
    with opener() as handle:
        while head.count(b"\n") < 64 and len(head) < 64 * BLOCK_BYTES:
            more = handle.read(BLOCK_BYTES)
            if not more:
                break
            head += more
            if not first and (len(head) >= len(_BOM) or not _BOM.startswith(head)):
                # JSON is told by its first character, as parse_sacct tells it
                first = (head[len(_BOM) :] if head.startswith(_BOM) else head).lstrip()[:1]
                if first == b"{":
                    return _JsonStream(opener, cluster, source)
        ended = not handle.read(1)
    layout = None if ended else _stream_layout(head, fields)
    if layout is None:
        whole = head
        if not ended:
            with opener() as handle:
                whole = handle.read()
        return _WholeStream(
            _parse_whole(whole, fields=fields, cluster=cluster, tz=tz, source=source), source
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


def _parse_whole(
    data: bytes, *, fields: Optional[Sequence[str]], cluster: str, tz: tzinfo, source: str
) -> ParseResult:
    from .parse import parse_sacct  # noqa: PLC0415  (the entry point imports this module)

    return parse_sacct(data, cluster=cluster, fields=fields, tz=tz, source=source)


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
