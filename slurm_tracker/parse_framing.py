"""Framing parsable sacct output (part of the reader, :mod:`slurm_tracker.parse`): which
layout a header announces, where each record starts and ends (``-p``, ``-P``, the live query's
strict form) and its cells by field name. Records are not decoded here (see parse_rows).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

from .errors import InputError
from .parse_fields import _Bad
from .sacct_format import CAPTURE_DELIMITER, FREE_TEXT_FIELDS, canonical_field

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

#: One record of parsable output as framed by the reader, not parsed yet: (its first line,
#: its bytes, why it cannot be read or None).
Framed = tuple[int, bytes, Optional[str]]


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    delimiter: str
    trailing: bool  # -p: every record ends with the delimiter

    @property
    def unique(self) -> bool:
        return len(set(self.names)) == len(self.names)


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


# --- the live query ---------------------------------------------------------------------------


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


def _live_framed(data: bytes, position: int, mark: bytes, count: int) -> Iterator[Framed]:
    """The records of the live query's output after its header (which ends at ``position``),
    framed by :func:`_live_record`, with their first line numbers."""
    return _live_framed_blocks(data, position, iter(()), mark, count, ended=True)


def _live_framed_blocks(
    data: bytes,
    position: int,
    more: Iterator[bytes],
    mark: bytes,
    count: int,
    *,
    ended: bool = False,
) -> Iterator[Framed]:
    """:func:`_live_framed` of an output whose first bytes are ``data`` (its header ending at
    ``position``) and whose rest ``more`` gives block by block, holding one block and the
    record being framed at a time: the same records, problems and line numbers as the whole
    output gives, wherever the blocks are cut. A record is framed once the bytes that decide
    where it ends are in (see :func:`_live_record`)."""
    line = 2
    while True:
        while position < len(data):
            if data[position : position + 1].isspace() and not data[position:].strip():
                break  # only blanks so far (checked when a blank is seen: it stays linear)
            found = _live_record(data, position, mark, count, ended)
            if found is None:
                break  # it may end in the next block
            chunk, problem, next_position = found
            yield line, chunk, problem
            line += data.count(b"\n", position, next_position)
            position = next_position
        if ended:
            return
        block = next(more, b"")
        ended = not block
        data = data[position:] + block
        position = 0


def _live_record(
    data: bytes, position: int, mark: bytes, count: int, ended: bool = True
) -> Optional[tuple[bytes, Optional[str], int]]:
    """(record, problem, where the next one starts) of the record at ``position``; None when
    that depends on bytes after ``data`` (not ``ended``: more may follow).

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
            if not ended:
                return None
            break
        end = found + len(mark)
    else:
        after = data[end : end + 1]
        if after == b"\n":
            return data[position : end - len(mark)], None, end + 1
        if not after and not ended:
            return None
    terminator = mark + b"\n"
    stop = data.find(terminator, position)
    if stop < 0:
        if not ended:
            return None
        return data[position:], "truncated record: it does not end with the delimiter", len(data)
    chunk = data[position:stop]
    return (
        chunk,
        f"has {chunk.count(mark) + 1} fields instead of {count}: sacct output was damaged",
        stop + len(terminator),
    )
