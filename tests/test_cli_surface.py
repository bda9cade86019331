"""One consistent command line: every command has -v/-q and the log options, an example in
its help, --output table|json (csv where rows make sense), and a manual built from it all."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from slurm_tracker.cli import main, manual
from slurm_tracker.output import OutputFormat
from tests.conftest import cli_runner, shown
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE
from tests.test_cli import CONFIG, ROWS, run

ROOT = click.Context(main, info_name="slurm-tracker")
LEAVES = [
    (" ".join(path), command)
    for path, command, _ctx in manual.commands(main, ROOT)
    if not isinstance(command, click.Group)
]
NO_LOGS = {"help"}  # prints the manual, nothing else


@pytest.fixture
def site(tmp_path: Path) -> Path:
    sacct = tmp_path / "fake-sacct"
    capture = tmp_path / "capture.txt"
    capture.write_bytes(live_capture(ROWS))
    write_fake_sacct(sacct, capture)
    (tmp_path / "config.yaml").write_text(CONFIG.format(base=BASE, sacct=sacct))
    return tmp_path


def options(command: click.Command) -> dict[str, click.Parameter]:
    return {name: p for p in command.params for name in getattr(p, "opts", [])}


def test_every_command_is_listed() -> None:
    names = {name for name, _ in LEAVES}
    assert {"sync", "backfill", "status", "check", "outbox list", "help"} <= names


@pytest.mark.parametrize(("name", "command"), LEAVES, ids=[n for n, _ in LEAVES])
def test_every_command_has_examples_and_the_log_options(name: str, command: click.Command) -> None:
    assert "Examples:" in (command.help or ""), f"`{name} --help` shows no example"
    if name in NO_LOGS:
        return
    given = options(command)
    for option in ("-v", "--verbose", "-q", "--quiet", "--log-format", "--syslog"):
        assert option in given, f"`{name}` has no {option}"


@pytest.mark.parametrize(("name", "command"), LEAVES, ids=[n for n, _ in LEAVES])
def test_output_always_means_the_format(name: str, command: click.Command) -> None:
    output = options(command).get("--output")
    if output is None:
        assert name in NO_LOGS | {"state set-mark"} or "--file" in options(command), name
        return
    assert isinstance(output.type, click.Choice), f"`{name} --output` is not a format"
    assert {"table", "json"} <= set(output.type.choices)


@pytest.mark.parametrize(
    "name", ["outbox list", "quarantine list", "corrections list", "catalog show", "sync"]
)
def test_row_commands_offer_csv(name: str) -> None:
    command = dict(LEAVES)[name]
    output = options(command)["--output"]
    assert isinstance(output.type, click.Choice) and "csv" in output.type.choices


def test_catalog_pull_writes_to_file_not_output() -> None:
    pull = options(dict(LEAVES)["catalog pull"])
    assert pull["--file"].metavar == "PATH"


def test_dry_run_csv_has_one_row_per_event_and_no_formula(site: Path) -> None:
    rows = [{**ROWS[0], "JobID": "21", "User": "=HYPERLINK(1)"}]
    (site / "capture.txt").write_bytes(live_capture(rows))
    result = run(
        site,
        "sync",
        "--dry-run",
        "--sacct-file",
        str(site / "capture.txt"),
        "--output",
        "csv",
    )
    assert result.exit_code == 0, shown(result)
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["allocation"] == "physics-2026" and float(row["quantity"]) == 4.0
    assert row["metadata.jobId"] == "21" and row["user"] == "'=HYPERLINK(1)"
    assert row["rated.unit"] == "core-hours"


def test_check_speaks_json(site: Path) -> None:
    result = run(site, "check", "--output", "json")
    assert result.exit_code == 0, shown(result)
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert [c["kind"] for c in doc["checks"]] == ["config", "catalog", "state file"]
    (site / "state.db").write_bytes(b"not a database" * 100)
    broken = run(site, "check", "--output", "json")
    assert broken.exit_code == 3


def test_help_prints_every_command() -> None:
    result = cli_runner().invoke(main, ["help"])
    assert result.exit_code == 0
    for name, _command in LEAVES:
        assert f"slurm-tracker {name}" in result.stdout
    outbox = cli_runner().invoke(main, ["help", "outbox"])
    assert (
        "slurm-tracker outbox list" in outbox.stdout and "slurm-tracker sync" not in outbox.stdout
    )
    assert cli_runner().invoke(main, ["help", "nothing"]).exit_code == 2


def test_the_man_page_is_roff_that_man_renders(tmp_path: Path) -> None:
    result = cli_runner().invoke(main, ["help", "--man"])
    assert result.exit_code == 0
    page = result.stdout
    assert page.startswith(".TH SLURM\\-TRACKER 1 ")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "ENVIRONMENT"):
        assert f"\n.SH {section}\n" in page
    # no line of help text may start a roff request by accident
    requests = {line.split()[0] for line in page.splitlines() if line.startswith((".", "'"))}
    assert requests <= {".TH", ".SH", ".SS", ".TP", ".PP", ".B", ".nf", ".fi"}
    groff = shutil.which("groff")
    assert groff, "groff renders the man page in this test; install groff (CI: apt install groff)"
    (tmp_path / "slurm-tracker.1").write_text(page)
    rendered = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "slurm-tracker.1")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr


def test_the_man_page_lists_the_exit_codes() -> None:
    page = cli_runner().invoke(main, ["help", "--man"]).stdout
    section = page.split("\n.SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    assert "0 ok" in section and "6 reconcile found discrepancies" in section
    assert "75 temporary" in section


def test_every_output_option_takes_its_choices_from_the_format_enum() -> None:
    formats = [f.value for f in OutputFormat]
    for name, command in LEAVES:
        output = options(command).get("--output")
        if output is None:
            continue
        assert isinstance(output.type, click.Choice), name
        choices = list(output.type.choices)
        assert choices == [f for f in formats if f in choices], f"`{name} --output`: {choices}"
        assert output.process_value(click.Context(command), "json") is OutputFormat.JSON, name


def test_cron_commands_never_load_the_report_modules(site: Path) -> None:
    """`report` imports slurm_tracker.costs inside the command: sync, backfill and status never
    pay for it (the first check also proves that the probe sees the report's import)."""
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from slurm_tracker.cli import main\n"
        "CliRunner().invoke(main, sys.argv[1:])\n"
        "print(sorted(m for m in sys.modules if m.startswith('slurm_tracker.costs')))\n"
    )
    config = ["--config", str(site / "config.yaml")]
    capture = str(site / "capture.txt")
    cases = [
        (["report", "--sacct-file", capture, *config], True),
        (["sync", "--dry-run", "--sacct-file", capture, *config], False),
        (
            ["backfill", "--start", "2026-01-01", "--dry-run", "--sacct-file", capture, *config],
            False,
        ),
        (["status", *config], False),
        (["status", "--check", *config], False),
    ]
    for args, loads in cases:
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True
        )
        loaded = done.stdout.strip().splitlines()[-1] != "[]"
        assert loaded == loads, (args, done.stdout, done.stderr)
