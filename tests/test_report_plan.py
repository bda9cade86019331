"""The dry run's table and CSV (report_plan, report_format.write_csv): the same bytes as
before they were written in bounded memory, and memory that does not hold the plan (issue 10).

The expected outputs in tests/data/plan-output/ were printed by the implementation that held
the whole plan (before the streaming writers, commit 5244922), from the capture and config
next to them: job
names with newlines, tabs, quotes, commas, formula starts and an escape sequence (which
click.echo strips when stdout is no terminal), unrated and held events, rejected records.
"""

from __future__ import annotations

import io
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bench_pipeline import config_text, write_capture
from slurm_tracker import inputs, ledger, pipeline, report, report_format, report_spool
from slurm_tracker.cli import main
from slurm_tracker.cli.plan_view import show_plan
from slurm_tracker.config import Config, config_from_text, load_config
from slurm_tracker.output import OutputFormat
from slurm_tracker.rating import Catalog
from slurm_tracker.report_spool import SpooledItems
from slurm_tracker.state import State
from tests.conftest import REPO, cli_runner

DATA = REPO / "tests" / "data" / "plan-output"
NOW = "2026-07-12T00:00:00Z"


def _sync(tmp: Path, capture: str = "capture.txt") -> list[str]:
    return [
        "sync",
        "--config",
        "config.yaml",
        "--state",
        str(tmp / "state.db"),
        "--dry-run",
        "--sacct-file",
        capture,
        "--now",
        NOW,
    ]


def _backfill(tmp: Path) -> list[str]:
    return [
        "backfill",
        "--config",
        "config.yaml",
        "--state",
        str(tmp / "state.db"),
        "--dry-run",
        "--sacct-file",
        "capture.txt",
        "--start",
        "2026-06-01",
        "--end",
        "2026-07-10T00:00:00Z",
        "-q",
    ]


CASES: dict[str, tuple[Callable[[Path], list[str]], list[str], str]] = {
    "table": (_sync, [], "sync.table.txt"),
    "table -v": (_sync, ["-v"], "sync.table-v.txt"),
    "csv": (_sync, ["--output", "csv"], "sync.csv"),
    "csv -v": (_sync, ["--output", "csv", "-v"], "sync.csv"),
    "json": (_sync, ["--output", "json"], "sync.json"),
    "backfill table -v": (_backfill, ["-v"], "backfill.table-v.txt"),
    "backfill csv": (_backfill, ["--output", "csv"], "backfill.csv"),
    "empty table -v": (lambda tmp: _sync(tmp, "empty.txt"), ["-v"], "empty.table-v.txt"),
    "empty csv": (lambda tmp: _sync(tmp, "empty.txt"), ["--output", "csv"], "empty.csv"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_dry_run_prints_what_it_printed_when_it_held_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """(The files show the input as named, relative to their folder, and the agent's id, which
    depends on the host and the state file's path, as ``<agent>``.)"""
    monkeypatch.chdir(DATA)
    command, extra, expected = CASES[case]
    done = cli_runner().invoke(main, [*command(tmp_path), *extra])
    assert done.exit_code == 0, done.output
    agent = ledger.agent_id(tmp_path / "state.db").encode()
    assert done.stdout_bytes.replace(agent, b"<agent>") == (DATA / expected).read_bytes()
    assert not (tmp_path / "state.db").exists()


def test_the_expected_outputs_cover_what_they_should() -> None:
    table = (DATA / "sync.table-v.txt").read_text(encoding="utf-8")
    assert "Events:" in table and "Held (" in table and "Rejected (" in table
    assert "Not rated (" in table
    rows = (DATA / "sync.csv").read_text(encoding="utf-8")
    assert "'=HYPERLINK(x)" in rows and "'@chem" in rows and '"with\nnewline"' in rows
    assert "\x1b" not in rows and ",red," in rows  # click.echo stripped the escape sequence
    assert rows.splitlines()[0].endswith(",rated.unit,rated.amount,rated.usd,rated")


# --- write_csv: csv_text, written as the rows come ---------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["=1+1", "+x", "-y", "@z", "\tt", "\rr", "a\r\nb", '"', ",", "\x1b[31m"])
)
_KEYS = st.sampled_from(["a", "b", "rated", "metadata", "x.y", ""]) | st.text(max_size=3)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.dictionaries(_KEYS, _VALUES, max_size=5) | _SCALARS, max_size=6),
    st.booleans(),
)
def test_write_csv_writes_what_csv_text_makes(rows: list[Any], on_disk: bool) -> None:
    out = io.StringIO(newline="")
    with mock.patch.object(report_spool, "MEMORY_BYTES", 1 if on_disk else 4 << 20):
        report.write_csv(iter(rows), out)
    assert out.getvalue() == report.csv_text(rows)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text() | st.lists(st.text(), max_size=3) | st.dictionaries(st.text(), st.text()),
        max_size=8,
    ),
    st.booleans(),
)
def test_spooled_items_read_back_as_they_were_written(items: list[Any], on_disk: bool) -> None:
    with mock.patch.object(report_spool, "MEMORY_BYTES", 1 if on_disk else 4 << 20):
        kept = SpooledItems()
        half = len(items) // 2
        for item in items[:half]:
            kept.append(item)
        assert list(kept) == items[:half]
        for item in items[half:]:  # appending after a read goes on at the end
            kept.append(item)
        assert list(kept) == list(kept) == items
        assert len(kept) == len(items)
        kept.close()


# --- the table, line by line -------------------------------------------------------------------


def _plans(config: Config, catalog: Optional[Catalog], capture: Path, tmp: Path) -> Any:
    store = State.open(tmp / "state.db", readonly=True)
    run = pipeline.dry_run(
        config,
        store,
        catalog,
        now_at=datetime(2026, 7, 12, tzinfo=timezone.utc),
        sacct_file=str(capture),
        fields=None,
        stdin=io.BytesIO(),
        environ={},
        agent="test",
    )
    return store, run


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("on_disk", [False, True])
def test_the_table_written_line_by_line_is_the_table_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbose: bool, on_disk: bool
) -> None:
    monkeypatch.setattr(report_spool, "MEMORY_BYTES", 1 if on_disk else 4 << 20)
    config = load_config(DATA / "config.yaml")
    catalog = pipeline.load_catalog(config)
    store, run = _plans(config, catalog, DATA / "capture.txt", tmp_path)
    with store:
        plans = list(run.plans)
    whole = pipeline.merge_plans(plans)
    expected = report.plan_text(
        whole, pipeline.totals(whole.events), run.window, source="x", verbose=verbose
    )
    out = io.StringIO()
    report.write_plan_table(iter(plans), run.window, out, source="x", verbose=verbose)
    assert out.getvalue() == expected + "\n"
    summary = report.summarize(iter(plans), verbose=verbose)
    assert report.summary_text(summary, run.window, source="x") == expected
    assert report.summary_text(summary, run.window, source="x") == expected  # read twice
    summary.close()
    assert ("Events:" in expected) == verbose


# --- memory ------------------------------------------------------------------------------------

ROWS = 4000  # about 6,000 events
WINDOW = pipeline.Window(
    datetime(2026, 6, 1, tzinfo=timezone.utc), datetime(2026, 7, 12, tzinfo=timezone.utc)
)


@dataclass
class Traced:
    peak: int  # the highest memory allocated after the first batch came, above it
    retained: int  # what was still allocated at the end, above it


class _Discard(io.TextIOBase):
    """Standard output that keeps nothing (CliRunner's would hold the whole output)."""

    def __init__(self) -> None:
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


def _traced(
    tmp: Path, capture: Path, consume: Callable[[pipeline.DryRun], None]
) -> tuple[Traced, int]:
    """Memory of ``consume`` showing the plans of a dry run of ``capture`` in batches of 200
    records (the real batches are 2,000: smaller ones let a small capture show what a large one
    would): what is allocated from the first batch on (the reader's first pass over the input,
    before it, is the same whatever is shown)."""
    config = config_from_text(config_text(tmp / "state.db"), "bench")
    catalog = pipeline.load_catalog(config)
    stream, _ = inputs.open_input(config, WINDOW, str(capture), None, io.BytesIO(), {})
    planner = pipeline.Planner(config, catalog, now_at=WINDOW.end_at)
    base: list[int] = []

    def marked(plans: Iterator[pipeline.Plan]) -> Iterator[pipeline.Plan]:
        for index, plan in enumerate(plans):
            if index == 0:
                tracemalloc.reset_peak()
                base.append(tracemalloc.get_traced_memory()[0])
            yield plan

    sink = _Discard()
    saved = sys.stdout
    sys.stdout = sink
    tracemalloc.start()
    try:
        plans = pipeline.plan_stream(stream, planner, lambda runs: {}, 200)
        consume(pipeline.DryRun(marked(plans), None, str(capture)))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sys.stdout = saved
    return Traced(peak - base[0], current - base[0]), sink.lines


@dataclass
class Baseline:
    capture: Path
    events: int
    dropped: Traced  # a dry run whose plans are consumed and dropped
    kept: Traced  # one that keeps every event (as -v and CSV did)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    tmp = tmp_path_factory.mktemp("memory")
    capture = tmp / "capture.txt"
    write_capture(capture, ROWS)
    events: list[Any] = []

    def drop(run: pipeline.DryRun) -> None:
        for _plan in run.plans:
            pass

    def keep(run: pipeline.DryRun) -> None:
        events.extend(e for plan in run.plans for e in plan.events)

    dropped, _ = _traced(tmp, capture, drop)
    kept, _ = _traced(tmp, capture, keep)
    return Baseline(capture, len(events), dropped, kept)


@pytest.mark.parametrize(
    ("output", "verbose"), [(OutputFormat.TABLE, 1), (OutputFormat.CSV, 0)], ids=["-v", "csv"]
)
def test_a_large_dry_run_is_shown_without_holding_its_events(
    baseline: Baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: OutputFormat,
    verbose: int,
) -> None:
    """What `sync --dry-run -v` (or `--output csv`) of a large capture allocates (tracemalloc)
    beyond a dry run that drops its plans is a small part of what keeping its events takes (as
    they were shown before: CSV and -v held the whole plan, and more)."""
    events_cost = baseline.kept.retained - baseline.dropped.retained
    assert baseline.events > ROWS  # about 1.5 events per row
    assert events_cost > 6 << 20  # about 1.6 kB an event: what streaming must not hold
    # a spool keeps up to MEMORY_BYTES in memory (4 MB per list): shrunk here, so that a small
    # capture shows what a large one would
    monkeypatch.setattr(report_spool, "MEMORY_BYTES", 64 << 10)

    def show(run: pipeline.DryRun) -> None:
        show_plan(run.plans, run.window, run.source, output, verbose)

    shown, lines = _traced(tmp_path, baseline.capture, show)
    assert lines >= baseline.events  # every event was written
    assert shown.peak - baseline.dropped.peak < events_cost // 10, (shown, baseline)
    assert shown.retained - baseline.dropped.retained < events_cost // 100, (shown, baseline)


def test_a_cell_with_a_carriage_return_is_quoted_on_every_python() -> None:
    # Python 3.13's csv quotes it; 3.9-3.12 wrote it bare, and a bare CR ends the row for
    # spreadsheets. Mutant: CsvWriter passing rows to csv.writer as they are (fails before 3.13).
    out = io.StringIO()
    writer = report_format.CsvWriter(out)
    writer.writerow(["cr\rhere", 'q"\r', "", None, 1.5, "a,b", "plain"])
    writer.writerow([""])
    assert out.getvalue() == '"cr\rhere","q""\r",,,1.5,"a,b",plain\n""\n'
    assert report_format.csv_text([{"name": "x\ry", "n": 2}]) == 'name,n\n"x\ry",2\n'
