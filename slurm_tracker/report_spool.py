"""Temporary files that keep what an output lists (events, skips...) while the input is still
being read, so that the listing is written at the end in bounded memory: in memory up to a few
MB, on disk beyond. Used by the streaming writers of the report modules."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any, TextIO

#: Bytes a spool keeps in memory before it moves to a temporary file on disk.
MEMORY_BYTES = 4 << 20


def _spool_file() -> IO[str]:
    # newline="": no translation either way (a "\r" written is read back as it was)
    return tempfile.SpooledTemporaryFile(
        max_size=MEMORY_BYTES, mode="w+", encoding="utf-8", newline=""
    )


class Spool:
    """Items of one JSON list, written as they come to a temporary file (in memory up to a
    few MB), copied into the document at the end."""

    def __init__(self) -> None:
        self.file = _spool_file()
        self.count = 0

    def add(self, text: str) -> None:
        self.file.write((",\n    " if self.count else "    ") + text)
        self.count += 1

    def copy_to(self, out: TextIO) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out, 1 << 20)
        self.file.close()


class SpooledItems:
    """A list of JSON values (text, lists of cells, objects of cells) kept in order in a
    temporary file, one JSON line each (in memory up to a few MB): append as they come, read
    back (as often as needed) by iterating. :meth:`close` frees it (as does garbage)."""

    def __init__(self) -> None:
        self.file = _spool_file()
        self.count = 0
        self._at_end = True

    def append(self, item: Any) -> None:
        if not self._at_end:
            self.file.seek(0, 2)
            self._at_end = True
        self.file.write(json.dumps(item) + "\n")  # JSON escapes every newline in the item
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        self.file.flush()
        self.file.seek(0)
        self._at_end = False
        loads = json.loads
        for line in self.file:
            yield loads(line)

    def close(self) -> None:
        self.file.close()
