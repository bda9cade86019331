"""Output formats behind one dispatch (as pip-audit's ``_format/`` does).

A command describes what it shows as a :class:`View`: one producer per format it offers, each
called only when that format is chosen. ``--output`` chooses an :class:`OutputFormat` (the
option's choices are taken from it: cli.common.output_option), and cli.common.emit prints
what that format's renderer makes of the view: one class per format, :data:`RENDERERS`. The
renderers hold the encodings that every command shares (JSON with two spaces of indent, CSV
of JSON-like rows with nested fields as dotted columns); the views hold what differs. A view may
also give, per format, a writer that writes its output as it is made (a dry run's plan: bounded
memory whatever its size); the renderer then hands that writer to the CLI instead of a text. No
printing and no click here: the CLI prints.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, TextIO

from slurm_tracker.report_format import csv_text
from slurm_tracker.times import utc_text


class OutputFormat(str, enum.Enum):
    """The values of ``--output``, in the order the help lists them."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    HTML = "html"

    @property
    def renderer(self) -> Renderer:
        return RENDERERS[self]


def jsonable(value: object) -> object:
    """JSON for what json.dumps cannot encode: times as RFC 3339 UTC, anything else as text."""
    if isinstance(value, datetime):
        return utc_text(value)
    return str(value)


@dataclass(frozen=True)
class View:
    """One result in each format a command offers; a part is made only if its format is chosen.

    ``table``: the text for people, followed by ``table_end`` (a newline: the text is lines
    without the last line's end). ``data``: the JSON document (also the CSV rows when it is a
    list, else its one row), encoded with ``json_default`` for values JSON has no type for
    (None: such a value is an error). ``write_json``, ``write_table`` and ``write_csv``: write
    that format's whole output (the same text, its last newline included) as it is made
    (bounded memory), instead of ``data``, ``table`` and ``csv`` (a view with ``write_table``
    needs no ``table``). ``csv`` and ``html``: the whole text, when the command has its own.
    """

    table: Optional[Callable[[], str]] = None
    data: Optional[Callable[[], Any]] = None
    json_default: Optional[Callable[[Any], Any]] = jsonable
    write_json: Optional[Callable[[TextIO], None]] = None
    write_table: Optional[Callable[[TextIO], None]] = None
    write_csv: Optional[Callable[[TextIO], None]] = None
    csv: Optional[Callable[[], str]] = None
    html: Optional[Callable[[], str]] = None
    table_end: str = "\n"


class Renderer:
    """One output format: the whole text of a view, or a writer that writes it as it is made."""

    def text(self, view: View) -> str:
        raise NotImplementedError

    def writer(self, view: View) -> Optional[Callable[[TextIO], None]]:
        """None: print :meth:`text` (the output is made whole first)."""
        return None


class TableFormat(Renderer):
    def text(self, view: View) -> str:
        return str(_part(view.table, "table")) + view.table_end

    def writer(self, view: View) -> Optional[Callable[[TextIO], None]]:
        return view.write_table


class JsonFormat(Renderer):
    def text(self, view: View) -> str:
        return json.dumps(_part(view.data, "json"), indent=2, default=view.json_default) + "\n"

    def writer(self, view: View) -> Optional[Callable[[TextIO], None]]:
        return view.write_json


class CsvFormat(Renderer):
    def text(self, view: View) -> str:
        if view.csv is not None:
            return view.csv()
        data = _part(view.data, "csv")
        return csv_text(data if isinstance(data, list) else [data])

    def writer(self, view: View) -> Optional[Callable[[TextIO], None]]:
        return view.write_csv


class HtmlFormat(Renderer):
    def text(self, view: View) -> str:
        return str(_part(view.html, "html"))


RENDERERS: dict[OutputFormat, Renderer] = {
    OutputFormat.TABLE: TableFormat(),
    OutputFormat.JSON: JsonFormat(),
    OutputFormat.CSV: CsvFormat(),
    OutputFormat.HTML: HtmlFormat(),
}


def _part(make: Optional[Callable[[], Any]], name: str) -> Any:
    if make is None:  # the command's --output offers no such format
        raise ValueError(f"this result has no {name} form")
    return make()
