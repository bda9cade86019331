"""The formatting every output shares: text safe for a terminal, aligned text tables, CSV of
JSON-like rows (whole, or written row by row in bounded memory) and JSON numbers. Pure."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, Optional, Protocol

from slurm_tracker.report_spool import SpooledItems


class TextSink(Protocol):
    """Where a streaming writer writes its text: a text file, a StringIO, the CLI's echo."""

    def write(self, text: str, /) -> object: ...


def printable(text: str, limit: int = 300) -> str:
    """``text`` safe for a terminal: control characters escaped (job names and corrupt
    records may hold escape sequences), cut to ``limit`` characters."""
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return shown if len(shown) <= limit else shown[:limit] + "..."


def number(value: Optional[Decimal]) -> Optional[float]:
    """A JSON number for a 6-decimal Decimal (round-trips exactly through float's repr)."""
    return None if value is None else float(value)


def fmt(value: Optional[Decimal], places: int = 6) -> str:
    """A quantity or amount for a table: thousands separated, ``places`` decimals; "-" for none."""
    if value is None:
        return "-"
    return f"{value:,.{places}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> str:
    """A plain aligned text table; columns whose index is in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    return "\n".join(table_lines(headers, rows, right, widths))


def table_lines(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    right: Sequence[int],
    widths: Sequence[int],
) -> Iterator[str]:
    """The lines of :func:`table` given its column widths (known in advance: the rows are read
    once, as they come)."""

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    yield line(headers)
    yield line(["-" * w for w in widths])
    for row in rows:
        yield line(row)


def _flat(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(inner, f"{prefix}.{key}" if prefix else str(key), into)
    elif isinstance(value, (list, tuple)):
        into[prefix] = json.dumps(value, default=str)
    elif isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        into[prefix] = "'" + value  # no spreadsheet runs a job name as a formula
    else:
        into[prefix] = "" if value is None else value


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def flat_row(row: Any) -> dict[str, Any]:
    """One CSV row of a JSON-like value: nested objects as dotted columns, lists as JSON text,
    formulas quoted (see :func:`csv_text`)."""
    into: dict[str, Any] = {}
    _flat(row if isinstance(row, dict) else {"value": row}, "", into)
    return into


#: Python 3.13's csv module quotes a cell holding a carriage return; older ones write it bare,
#: and a lone CR ends the row for many readers (spreadsheets among them). CsvWriter does what
#: 3.13 does on every version.
_CSV_QUOTES_CR = sys.version_info >= (3, 13)


class CsvWriter:
    """``csv.writer(out, lineterminator="\n")``, but a cell holding a carriage return is quoted
    on every Python version (as 3.13 quotes it), so the same rows give the same bytes."""

    def __init__(self, out: TextSink) -> None:
        self._out = out
        self._writer = csv.writer(out, lineterminator="\n")

    def writerow(self, row: Sequence[Any]) -> None:
        if _CSV_QUOTES_CR or not any(isinstance(c, str) and "\r" in c for c in row):
            self._writer.writerow(row)
            return
        self._out.write(",".join(_csv_cell(c) for c in row) + "\n")


def _csv_cell(value: Any) -> str:
    """One cell of a row of several, as the csv module (3.13) writes it."""
    if isinstance(value, str) and "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    if value is None or value == "":
        return ""
    one = io.StringIO()
    csv.writer(one, lineterminator="").writerow([value])
    return one.getvalue()


def csv_text(rows: Sequence[Any]) -> str:
    """CSV of JSON-like rows: one line per row, nested objects as dotted columns (``rated.usd``),
    lists as JSON text; the columns in the order they first appear. Text that a spreadsheet
    would run as a formula (``=``, ``+``, ``-``, ``@``...) starts with a quote."""
    flat = [flat_row(row) for row in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    out = io.StringIO()
    writer = CsvWriter(out)
    writer.writerow(columns)
    for row in flat:
        writer.writerow([row.get(name, "") for name in columns])
    return out.getvalue()


def write_csv(rows: Iterable[Any], out: TextSink) -> None:
    """:func:`csv_text` of ``rows`` written to ``out``, byte for byte, in bounded memory: each
    row is flattened as it comes and kept, as the text of its cells, in a temporary file (the
    header, whose columns are known only when every row is in, comes first), then written."""
    columns: dict[str, None] = {}
    kept = SpooledItems()
    try:
        for row in rows:
            flat = flat_row(row)
            columns.update(dict.fromkeys(flat))
            kept.append({k: _cell(v) for k, v in flat.items()})
        writer = CsvWriter(out)
        writer.writerow(list(columns))
        names = list(columns)
        for cells in kept:
            writer.writerow([cells.get(name, "") for name in names])
    finally:
        kept.close()


def _cell(value: Any) -> str:
    """A value as the csv module writes it (None empty, anything else ``str()``)."""
    return "" if value is None else str(value)
