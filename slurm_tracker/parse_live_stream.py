"""The live query's output as a stream (part of the reader, :mod:`slurm_tracker.parse`, which
re-exports these names): framed strictly, as :func:`parse_live` frames it whole, from the file
it was spooled to (inputs.call_sacct: block by block, in bounded memory) or from memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timezone
from typing import BinaryIO, Callable

from .parse_framing import Framed, _Layout, _live_framed, _live_framed_blocks, _live_header
from .parse_steps import Row, _framed_row
from .parse_stream import RecordStream, _at_least, _blocks, _ParsableStream


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


class _LiveFileStream(_ParsableStream):
    """The live query's output, spooled to a file (``opener`` opens it, once per pass), read
    block by block and framed strictly as parse_live frames it whole."""

    def __init__(self, opener: Callable[[], BinaryIO], mark: bytes, header: int,
                 fields: Sequence[str], cluster: str, source: str) -> None:  # fmt: skip
        super().__init__(_Layout(tuple(fields), mark.decode(), True), cluster, timezone.utc, source)
        self._opener = opener
        self._mark = mark
        self._header = header

    def framed(self) -> Iterator[Framed]:
        with self._opener() as handle:
            blocks = _blocks(handle)
            data = _at_least(blocks, self._header)
            yield from _live_framed_blocks(data, self._header, blocks, self._mark, self._expected)


def _live_file_header(
    opener: Callable[[], BinaryIO], mark: bytes, fields: Sequence[str], source: str
) -> int:
    """The length of the header of a spooled live output; InputError when it is not the one
    asked for (as parse_live says)."""
    with opener() as handle:
        head = _at_least(
            _blocks(handle), len(mark.join(f.encode() for f in fields)) + 2 * len(mark) + 1
        )
    return _live_header(head, mark, fields, source)


def live_file_stream(
    opener: Callable[[], BinaryIO],
    *,
    delimiter: str,
    fields: Sequence[str],
    cluster: str,
    source: str,
) -> RecordStream:
    """The records of the live query's output spooled to a file that ``opener`` opens (once
    per pass), as :func:`parse_live` reads them whole (the same InputError, now, when the
    header is not the one asked for)."""
    mark = delimiter.encode()
    header = _live_file_header(opener, mark, fields, source)
    return _LiveFileStream(opener, mark, header, fields, cluster, source)


def live_file_rows(
    opener: Callable[[], BinaryIO], *, delimiter: str, fields: Sequence[str], source: str
) -> Iterator[Row]:
    """The records (allocations and steps) of a report query's output spooled to a file, as
    :func:`live_rows` frames them whole (the same InputError, now, for a wrong header)."""
    mark = delimiter.encode()
    header = _live_file_header(opener, mark, fields, source)
    layout = _Layout(tuple(fields), delimiter, trailing=True)

    def rows() -> Iterator[Row]:
        with opener() as handle:
            blocks = _blocks(handle)
            data = _at_least(blocks, header)
            for line, chunk, problem in _live_framed_blocks(
                data, header, blocks, mark, len(fields)
            ):
                yield _framed_row(chunk, layout, problem, line)

    return rows()


def live_stream(
    data: bytes, *, delimiter: str, fields: Sequence[str], cluster: str, source: str
) -> RecordStream:
    """The records of the live query's output, as :func:`parse_live` reads them (the same
    InputError when the header is not the one asked for)."""
    mark = delimiter.encode()
    header = _live_header(data, mark, fields, source)
    return _LiveStream(data, mark, header, fields, cluster, source)
