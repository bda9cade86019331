"""slurm_tracker.output: one renderer per --output format, chosen by the OutputFormat enum;
cli.common.emit prints what it makes, cli.common.output_option offers the formats."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import click
import pytest
from click.testing import CliRunner

from slurm_tracker.cli.common import emit, output_option
from slurm_tracker.output import RENDERERS, OutputFormat, View

AT = datetime(2026, 11, 30, 13, 0, tzinfo=timezone(timedelta(hours=1)))


def never() -> NoReturn:
    raise AssertionError("a part of the view was made for a format that was not chosen")


def text(output: OutputFormat, view: View) -> str:
    return output.renderer.text(view)


def test_every_format_has_its_renderer() -> None:
    assert set(RENDERERS) == set(OutputFormat)
    assert len({id(r) for r in RENDERERS.values()}) == len(OutputFormat)


def test_the_table_is_printed_as_lines_unless_it_ends_its_own() -> None:
    assert text(OutputFormat.TABLE, View(lambda: "a\nb", data=never)) == "a\nb\n"
    assert text(OutputFormat.TABLE, View(lambda: "", data=never)) == "\n"
    assert text(OutputFormat.TABLE, View(lambda: "a\n", table_end="")) == "a\n"


def test_json_has_two_spaces_of_indent_and_times_in_utc() -> None:
    view = View(never, data=lambda: {"at": AT, "n": [1]})
    assert (
        text(OutputFormat.JSON, view)
        == '{\n  "at": "2026-11-30T12:00:00Z",\n  "n": [\n    1\n  ]\n}\n'
    )
    as_str = View(never, data=lambda: {"at": AT}, json_default=str)
    assert json.loads(text(OutputFormat.JSON, as_str)) == {"at": str(AT)}
    with pytest.raises(TypeError):
        text(OutputFormat.JSON, View(never, data=lambda: {"at": AT}, json_default=None))


def test_json_written_as_it_is_made_goes_to_stdout_unbuffered() -> None:
    def write(out: Any) -> None:
        out.write('{"streamed": true}\n')

    @click.command()
    def command() -> None:
        emit(OutputFormat.JSON, View(never, data=never, write_json=write))

    assert CliRunner().invoke(command).stdout == '{"streamed": true}\n'


def test_a_table_or_csv_written_as_it_is_made_replaces_its_text() -> None:
    def writes(text: str) -> Any:
        return lambda out: out.write(text)

    view = View(never, data=never, csv=never, write_table=writes("t\n"), write_csv=writes("c\n"))

    @click.command()
    @output_option(*OutputFormat)
    def command(output: OutputFormat) -> None:
        emit(output, view)

    assert CliRunner().invoke(command, ["--output", "table"]).stdout == "t\n"
    assert CliRunner().invoke(command, ["--output", "csv"]).stdout == "c\n"
    for output in (OutputFormat.TABLE, OutputFormat.CSV, OutputFormat.JSON):
        assert output.renderer.writer(View(lambda: "a")) is None  # no writer: the text


def test_csv_rows_are_the_json_list_or_its_one_object() -> None:
    rows = View(never, data=lambda: [{"a": 1, "b": {"c": "=1"}}, {"a": 2}])
    assert text(OutputFormat.CSV, rows) == "a,b.c\n1,'=1\n2,\n"
    assert text(OutputFormat.CSV, View(never, data=lambda: {"a": 1})) == "a\n1\n"
    own = View(never, data=never, csv=lambda: "x\n")
    assert text(OutputFormat.CSV, own) == "x\n"


def test_html_only_where_a_command_has_it() -> None:
    assert text(OutputFormat.HTML, View(never, html=lambda: "<p>\n")) == "<p>\n"
    with pytest.raises(ValueError, match="no html form"):
        text(OutputFormat.HTML, View(lambda: "a"))


def test_emit_prints_exactly_the_renderers_text() -> None:
    view = View(lambda: "t", data=lambda: {"k": "v"})

    @click.command()
    @output_option(*OutputFormat)
    def command(output: OutputFormat) -> None:
        assert isinstance(output, OutputFormat)
        emit(output, view)

    for output in ("table", "json", "csv"):
        result = CliRunner().invoke(command, ["--output", output])
        assert result.exit_code == 0, result.output
        assert result.stdout == text(OutputFormat(output), view)
    assert CliRunner().invoke(command, []).stdout == "t\n"


def test_the_option_offers_the_formats_given_in_the_enums_order() -> None:
    @click.command()
    @output_option(OutputFormat.TABLE, OutputFormat.JSON, help="Pick one.")
    def command(output: OutputFormat) -> None:
        click.echo(repr(output))

    result = CliRunner().invoke(command, ["--help"])
    assert "[table|json]" in result.stdout and "[default: table]" in result.stdout
    refused = CliRunner().invoke(command, ["--output", "csv"])
    assert refused.exit_code == 2 and "csv" in refused.output
