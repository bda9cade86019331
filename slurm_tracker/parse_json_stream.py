"""Reading a ``{"jobs": [...]}`` JSON document block by block (part of the reader,
:mod:`slurm_tracker.parse`; sacct's meaning of the jobs is in :mod:`slurm_tracker.parse_json`).

``sacct --json`` prints one object whose ``jobs`` list holds the whole window: read with
``json.loads`` it is a tree about ten times the file's size. Here the text is decoded in blocks
and the top-level object is walked member by member: each element of a ``jobs`` array is
decoded on its own (``json.JSONDecoder.raw_decode``, the C scanner ``json.loads`` uses), the
other members whole (``meta``, ``errors``, ``warnings``: small). Memory is a block plus the
largest job, whatever the file's size.

What is accepted, and every error, is exactly what ``json.loads`` of the whole document
gives: the same decoder reads every value, the text is decoded as ``json.loads`` decodes bytes
(``json.detect_encoding``, ``surrogatepass``), and a problem is reported with its position in
the whole document (line, column, character; a byte offset for a decoding error). Where the
top-level structure itself is wrong (a missing comma, a trailing one, text after the end), the
decoder is asked for its own message on a short text that puts it in the same state, so the
wording is the running Python's. A decoding error anywhere in the file wins over a syntax
error, as when the whole file is decoded first.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Generator, Iterator
from typing import Any, Optional, Union

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # json's own

#: How close to the end of the text read so far an error may be the text being cut short
#: (the longest token json fails on only when it sees its end: ``-Infinity``, ``\uXXXX``).
_NEAR_END = 64

#: Decoder states, as text that puts the decoder in them: after a member's value, at the
#: start of the jobs array, after a job.
_AFTER_MEMBER = '{"":null'
_IN_JOBS = '{"":['
_AFTER_JOB = '{"":[null'


class NotJson(ValueError):
    """The document is not valid JSON; the message is the one ``json.loads`` gives."""


#: What the walk gives: ("member", key, value) for each member of the top-level object but a
#: "jobs" array, ("jobs", None, None) where a "jobs" array starts, ("job", None, element) for
#: each of its elements, in the document's order.
Event = tuple[str, Optional[str], Any]


class _Text:
    """The text of a document read block by block: ``text`` holds it from ``base`` (an absolute
    character position) on; what lies before ``keep`` may be dropped when more is read."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        first = b""
        while len(first) < 4:
            block = next(blocks, b"")
            if not block:
                break
            first += block
        self._blocks = blocks
        self._first: Optional[bytes] = first
        self._encoding = json.detect_encoding(first)  # as json.loads decodes bytes
        self._decoder = codecs.getincrementaldecoder(self._encoding)("surrogatepass")
        self._fed = 0  # bytes given to the decoder
        self.text = ""
        self.base = 0
        self.keep = 0
        self.ended = False
        self._lines = 0  # newlines before base
        self._last_newline = -1  # absolute position of the last newline before base

    # --- reading ---------------------------------------------------------------------------

    def _next_block(self) -> bytes:
        if self._first is not None:
            block, self._first = self._first, None
            return block
        return next(self._blocks, b"")

    def _decode(self, block: bytes) -> str:
        final = not block
        pending = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as exc:
            start = self._fed - pending + exc.start
            end = self._fed - pending + exc.end
            if exc.end == exc.start + 1:
                detail = f"byte 0x{exc.object[exc.start]:02x} in position {start}"
            else:
                detail = f"bytes in position {start}-{end - 1}"
            raise NotJson(f"'{exc.encoding}' codec can't decode {detail}: {exc.reason}") from None
        self._fed += len(block)
        return text

    def more(self, want: int = 1) -> bool:
        """Read at least ``want`` more characters (fewer at the end of the document), dropping
        the text before ``keep``; False when the end was reached before."""
        if self.ended:
            return False
        drop = self.keep - self.base
        if drop > 0:
            newline = self.text.rfind("\n", 0, drop)
            if newline >= 0:
                self._lines += self.text.count("\n", 0, drop)
                self._last_newline = self.base + newline
            self.text = self.text[drop:]
            self.base = self.keep
        pieces = [self.text]
        got = 0
        while got < max(want, 1) and not self.ended:
            block = self._next_block()
            piece = self._decode(block)
            self.ended = not block
            pieces.append(piece)
            got += len(piece)
        self.text = "".join(pieces)
        return True

    def drain(self) -> None:
        """Decode the rest of the document, keeping none of it: a decoding error there is the
        error json.loads reports (it decodes the whole file before reading any of it)."""
        while not self.ended:
            block = self._next_block()
            self._decode(block)
            self.ended = not block

    # --- scanning --------------------------------------------------------------------------

    def char(self, pos: int) -> str:
        """The character at ``pos``, "" at the end of the document."""
        while pos - self.base >= len(self.text):
            if not self.more():
                return ""
        return self.text[pos - self.base]

    def skip_whitespace(self, pos: int) -> int:
        while True:
            index = _WHITESPACE.match(self.text, pos - self.base).end()  # type: ignore[union-attr]
            pos = self.base + index
            if index < len(self.text) or not self.more():
                return pos

    def value(self, pos: int) -> tuple[Any, int]:
        """The value starting at ``pos`` and where it ends, as the decoder reads it."""
        found: tuple[Any, int] = self._scan(pos, _DECODER.raw_decode)
        return found

    def key(self, pos: int) -> tuple[str, int]:
        """The member name whose text starts at ``pos`` (after its opening quote)."""
        found: tuple[str, int] = self._scan(pos, _scan_string)
        return found

    def _scan(self, pos: int, scan: Any) -> Any:
        while True:
            index = pos - self.base
            try:
                found, end = scan(self.text, index)
            except json.JSONDecodeError as exc:
                cut_short = exc.pos >= len(self.text) - _NEAR_END or exc.msg.startswith(
                    "Unterminated string"
                )
                if cut_short and self.more(len(self.text) - index):
                    continue  # the value goes on in the next block(s)
                self.fail_at(exc.msg, self.base + exc.pos)
            except (ValueError, RecursionError) as exc:  # e.g. an integer too long to convert
                self.drain()
                raise NotJson(str(exc)) from None
            if len(self.text) - end < _NEAR_END and self.more(len(self.text) - index):
                continue  # a number may go on in the next block ("1" then "e5")
            return found, self.base + end

    # --- errors ----------------------------------------------------------------------------

    def fail_at(self, message: str, pos: int) -> None:
        """Raise NotJson for ``message`` at the absolute position ``pos`` (in the text)."""
        index = pos - self.base
        lines = self._lines + self.text.count("\n", 0, index)
        newline = self.text.rfind("\n", 0, index)
        last = self.base + newline if newline >= 0 else self._last_newline
        self.drain()
        raise NotJson(f"{message}: line {lines + 1} column {pos - last} (char {pos})")

    def fail(self, state: str, start: int, pos: int) -> None:
        """Raise the decoder's own error for the text from ``start`` to the unexpected character
        at ``pos``, the decoder being in ``state`` (text that leads to it) at ``start``."""
        local = state + self.text[start - self.base : pos - self.base + 1]
        try:
            json.loads(local)
        except json.JSONDecodeError as exc:
            self.fail_at(exc.msg, start + exc.pos - len(state))
        found = self.char(pos)
        self.fail_at("Expecting value" if found else "Unexpected end of data", pos)


def _scan_string(text: str, index: int) -> tuple[str, int]:
    found: tuple[str, int] = json.decoder.scanstring(text, index, True)  # type: ignore[attr-defined]
    return found


def events(blocks: Iterator[bytes]) -> Iterator[Event]:
    """The walk of the JSON document whose bytes ``blocks`` gives (see :data:`Event`): at the
    end the whole document was read. Raises NotJson, with json.loads' message, when it is not
    valid JSON, or not an object (the caller refuses anything else before)."""
    doc = _Text(blocks)
    pos = doc.skip_whitespace(0)
    if doc.char(pos) != "{":
        doc.fail("", 0, pos)
    state, start = "{", pos + 1
    pos = doc.skip_whitespace(pos + 1)
    if doc.char(pos) != "}":
        while True:
            if doc.char(pos) != '"':
                doc.fail(state, start, pos)
            key, pos = doc.key(pos + 1)
            pos = doc.skip_whitespace(pos)
            if doc.char(pos) != ":":
                doc.fail(state, start, pos)
            pos = doc.skip_whitespace(pos + 1)
            if key == "jobs" and doc.char(pos) == "[":
                yield ("jobs", None, None)
                pos = yield from _jobs(doc, pos + 1)
            else:
                value, pos = doc.value(pos)
                yield ("member", key, value)
            state, start = _AFTER_MEMBER, pos
            doc.keep = pos
            pos = doc.skip_whitespace(pos)
            found = doc.char(pos)
            if found == "}":
                break
            if found != ",":
                doc.fail(state, start, pos)
            pos = doc.skip_whitespace(pos + 1)
            if doc.char(pos) != '"':
                doc.fail(state, start, pos)  # a trailing comma: the decoder's own words
    state, start = "{}", pos + 1
    doc.keep = start
    pos = doc.skip_whitespace(start)
    if doc.char(pos):
        doc.fail(state, start, pos)  # "Extra data"


def _jobs(doc: _Text, pos: int) -> Generator[Event, None, int]:
    """The elements of the array after ``[`` at ``pos``; returns where the array ends."""
    state, start = _IN_JOBS, pos
    pos = doc.skip_whitespace(pos)
    if doc.char(pos) == "]":
        return pos + 1
    while True:
        job, pos = doc.value(pos)
        yield ("job", None, job)
        state, start = _AFTER_JOB, pos
        doc.keep = pos
        pos = doc.skip_whitespace(pos)
        found = doc.char(pos)
        if found == "]":
            return pos + 1
        if found != ",":
            doc.fail(state, start, pos)
        pos = doc.skip_whitespace(pos + 1)
        if doc.char(pos) == "]":
            doc.fail(state, start, pos)  # a trailing comma: the decoder's own words


def blocks_of(data: Union[bytes, bytearray], size: int) -> Iterator[bytes]:
    """``data`` in blocks of ``size`` bytes."""
    for start in range(0, len(data), size):
        yield bytes(data[start : start + size])
