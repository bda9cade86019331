"""The streaming core: a capture read block by block, planned batch by batch and written event
by event gives exactly what reading, planning and printing it whole gives (issue 10)."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import inputs, parse, parse_framing, parse_stream, pipeline, rating, report
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.errors import InputError
from slurm_tracker.models import JobRecord, ParseResult, PlannedEvent, Rejected, RunKey
from slurm_tracker.parse import parse_sacct, saved_stream
from slurm_tracker.state import State
from tests.conftest import REPO, cli_runner

UTC = timezone.utc
NOW = datetime(2026, 7, 12, tzinfo=UTC)
CONFIG = config_from_text(
    """
cluster: box
reporting_interval: 15m
accounts: {map: {physics: phys, chemistry: chem}, ignore: [root]}
partitions:
  map:
    gpu: [{sku: GPU_HOUR, metric: gpu}, {sku: CPU_HOUR, metric: cpu}]
    compute: CPU_HOUR
metadata: {fields: [job_name, qos]}
limits: {hold_above: 40}
""",
    "test",
)
CATALOG = rating.catalog_from_data(
    {
        "units": [
            {
                "name": "usd",
                "ratedInUsd": True,
                "rules": [
                    {"effectiveFrom": "2026-01-01T00:00:00Z", "effectiveTo": None, "rate": 0.04}
                ],
                "skus": [
                    {
                        "code": "GPU_HOUR",
                        "rules": [
                            {
                                "effectiveFrom": "2026-01-01T00:00:00Z",
                                "effectiveTo": "2026-06-25T00:00:00Z",
                                "rate": 2.5,
                            }
                        ],
                    },
                    {"code": "CPU_HOUR", "rules": []},
                ],
            }
        ]
    },
    "test",
)
HEADER = "JobID|JobIDRaw|Account|Partition|Submit|Start|End|ElapsedRaw|AllocTRES|QOS|JobName"
NAMES = ["plain", "with\nnewline", "\n", "", "x|y", "\n\nz", "a|\nb", "ünï", "tab\there", '"q"']


def capture(
    rows: int, *, trailing: bool = False, seed: int = 1, duplicates: int = 0, noise: bool = True
) -> bytes:
    """A saved capture (``-P``, or ``-p`` with ``trailing``) of ``rows`` records: job names
    with newlines and delimiters, blank and damaged lines, steps, running runs, a rate change
    and a month boundary inside the runs; ``duplicates`` records repeat an earlier run (a
    running record of a final run, or the reverse), far from it."""
    rng = random.Random(seed)
    end = "|" if trailing else ""
    lines = [HEADER + end]
    made: list[str] = []
    for i in range(rows):
        start = datetime(2026, 6, 10, tzinfo=UTC) + timedelta(seconds=rng.randrange(30 * 86400))
        elapsed = rng.randrange(1, 3 * 86400)
        running = rng.random() < 0.15
        partition = rng.choice(["compute", "gpu", "gpu", "nowhere"])
        account = rng.choice(["physics", "chemistry", "root", "", "unmapped"])
        tres = f"cpu={rng.choice([1, 8])},mem=1000M,node=1" + (
            f",gres/gpu={rng.choice([1, 4])}" if partition == "gpu" else ""
        )
        stamp = "%Y-%m-%dT%H:%M:%S"
        fields = [
            str(1000 + i),
            str(1000 + i),
            account,
            partition,
            f"{start - timedelta(seconds=30):{stamp}}",
            f"{start:{stamp}}",
            "Unknown" if running else f"{start + timedelta(seconds=elapsed):{stamp}}",
            str(elapsed),
            tres,
            "normal",
            rng.choice(NAMES),
        ]
        line = "|".join(fields) + end
        lines.append(line)
        made.append(line)
        if noise and rng.random() < 0.05:
            lines.append(line.replace(f"|{1000 + i}|", f"|{1000 + i}.batch|", 1))  # a step
        if noise and rng.random() < 0.03:
            lines.append("")
        if noise and rng.random() < 0.02:
            lines.append(f"{5000 + i}|{5000 + i}|physics|compute|garbage" + end)  # damaged
        if noise and rng.random() < 0.03:  # implausible: refused by the planner
            cells = [f"{7000 + i}", f"{7000 + i}", *fields[2:]]
            cells[6] = f"{start + timedelta(seconds=max(0, elapsed - 1000)):{stamp}}"
            cells[3], cells[2] = "compute", "physics"
            lines.append("|".join(cells) + end)
    for _ in range(duplicates):
        twin = rng.choice(made[: max(1, len(made) // 4)])
        cells = twin.split("|")
        cells[6] = "Unknown" if cells[6] != "Unknown" else cells[5]
        cells[7] = str(int(cells[7]) + rng.choice([-1, 0, 500]))
        if cells[6] != "Unknown":  # a final record: End = Start + elapsed
            start_at = datetime.strptime(cells[5], "%Y-%m-%dT%H:%M:%S")
            cells[6] = f"{start_at + timedelta(seconds=int(cells[7])):%Y-%m-%dT%H:%M:%S}"
        lines.append("|".join(cells))
    return ("\n".join(lines) + "\n").encode()


def opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def items(stream: parse.RecordStream) -> ParseResult:
    found = list(stream.items())
    return ParseResult(
        records=tuple(i for i in found if isinstance(i, JobRecord)),
        rejected=tuple(i for i in found if isinstance(i, Rejected)),
        steps_ignored=sum(i is None for i in found),
    )


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(parse_stream, "BLOCK_BYTES", 97)  # cuts fall everywhere, mid-record too
    yield


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("trailing", [False, True])
@pytest.mark.parametrize("variant", ["plain", "crlf", "bom-and-blank-lines"])
@pytest.mark.parametrize("block", [61, 97, 1000, 1 << 20])
def test_a_capture_read_in_blocks_reads_as_it_does_whole(
    monkeypatch: pytest.MonkeyPatch, trailing: bool, variant: str, block: int
) -> None:
    data = capture(400, trailing=trailing)
    if variant == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif variant == "bom-and-blank-lines":
        data = b"\xef\xbb\xbf\n \n" + data
    monkeypatch.setattr(parse_stream, "BLOCK_BYTES", block)
    stream = saved_stream(opener(data), cluster="box", source="x")
    whole = len(data) <= block  # read whole when it all came in the first block
    assert isinstance(stream, parse_stream._WholeStream if whole else parse_stream._SavedStream)
    assert items(stream) == parse_sacct(data, cluster="box", source="x")


def test_a_headerless_capture_reads_in_blocks_too(small_blocks: None) -> None:
    data = capture(300)
    fields = HEADER.split("|")
    body = data.split(b"\n", 1)[1]
    stream = saved_stream(opener(body), cluster="box", fields=fields, source="x")
    assert isinstance(stream, parse_stream._SavedStream)
    assert items(stream) == parse_sacct(body, cluster="box", fields=fields, source="x")


def test_small_captures_are_read_whole_and_json_job_by_job(small_blocks: None) -> None:
    for path, kind in (
        (REPO / "examples/sacct-sample.txt", parse_stream._WholeStream),
        (REPO / "tests/data/sacct-box-22.05.json", parse_stream._JsonStream),
    ):
        data = path.read_bytes()
        stream = saved_stream(opener(data), cluster="box", source="x")
        assert isinstance(stream, kind)
        assert items(stream) == parse_sacct(data, cluster="box", source="x")


def test_the_live_stream_reads_as_parse_live() -> None:
    data = (REPO / "tests/data/sacct-box-22.05.txt").read_bytes()
    fields = data.split(b"\n", 1)[0].decode().split("|#|")[:-1]
    stream = parse.live_stream(data, delimiter="|#|", fields=fields, cluster="box", source="x")
    found = items(stream)
    whole = parse.parse_live(data, delimiter="|#|", fields=fields, cluster="box", source="x")
    assert found == whole
    assert len(whole.records) > 10
    with pytest.raises(InputError, match="header of the query"):
        parse.live_stream(data[5:], delimiter="|#|", fields=fields, cluster="box", source="x")


_MARK = b"|~0123456789abcdef0123456789abcdef~|"
_PIECES = [b"a", b"b c", b"\n", b" ", b"\n\n", _MARK, _MARK + b"\n", _MARK[:5], b"|", b"x" * 300]


@settings(max_examples=400, deadline=None)
@given(
    records=st.lists(
        st.one_of(
            st.lists(st.sampled_from(_PIECES), max_size=4).map(b"".join),  # damage
            st.lists(
                st.sampled_from([b"", b"1", b"a\nb", b"\n", b" ", b"x" * 200]),
                min_size=3,
                max_size=3,
            ).map(lambda cells: _MARK.join(cells) + _MARK + b"\n"),
        ),
        max_size=12,
    ),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=30),
)
def test_the_live_output_framed_block_by_block_frames_as_it_does_whole(
    records: list[bytes], cuts: list[int]
) -> None:
    """Records of 3 fields (the last may hold newlines, or begin with one), damaged ones,
    blanks, a record cut short at the end: every cut of the output into blocks frames it as the
    whole output does."""
    data = b"A" + _MARK + b"B" + _MARK + b"C" + _MARK + b"\n" + b"".join(records)
    header = data.index(b"\n") + 1
    whole = list(parse_framing._live_framed(data, header, _MARK, 3))
    blocks, at = [], header
    for size in cuts * 50:
        if at >= len(data):
            break
        blocks.append(data[at : at + size])
        at += size
    blocks.append(data[at:])
    first = data[:header]
    framed = parse_framing._live_framed_blocks(first, header, iter(blocks), _MARK, 3)
    assert list(framed) == whole


def test_a_live_record_is_framed_alike_wherever_it_is_cut() -> None:
    """Job names beginning with a newline (a delimiter + newline inside the record), a damaged
    record, a record cut short: two blocks, cut at every byte."""
    rows = [[b"1", b"a", b"\nname"], [b"2", b"", b"\n"], [b"3", b"b", b"x\n\ny"]]
    body = b"".join(_MARK.join(r) + _MARK + b"\n" for r in rows)
    data = b"A" + _MARK + b"B" + _MARK + b"C" + _MARK + b"\n" + body + b"4" + _MARK + b"\n5" + _MARK
    header = data.index(b"\n") + 1
    whole = list(parse_framing._live_framed(data, header, _MARK, 3))
    assert [problem is None for _, _, problem in whole] == [True, True, True, False, False]
    for cut in range(header, len(data) + 1):
        blocks = iter([b for b in (data[header:cut], data[cut:]) if b])  # as files give them
        framed = parse_framing._live_framed_blocks(data[:header], header, blocks, _MARK, 3)
        assert list(framed) == whole, cut


@pytest.mark.parametrize("block", [97, 1 << 20])
def test_the_box_capture_read_as_a_saved_file_in_blocks(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    data = (REPO / "tests/data/sacct-box-22.05.txt").read_bytes() * 3  # > 64 lines
    monkeypatch.setattr(parse_stream, "BLOCK_BYTES", block)
    stream = saved_stream(opener(data), cluster="box", source="x")
    assert items(stream) == parse_sacct(data, cluster="box", source="x")


# --- duplicates ------------------------------------------------------------------------------


def whole_plan(data: bytes, reported: Optional[dict[RunKey, int]] = None) -> pipeline.Plan:
    parsed = parse_sacct(data, cluster="box", source="x")
    return pipeline.plan_usage(parsed, reported or {}, CONFIG, CATALOG, now_at=NOW)


def streamed(
    data: bytes, batch: int = 37, reported: Optional[dict[RunKey, int]] = None
) -> list[pipeline.Plan]:
    stream = saved_stream(opener(data), cluster="box", source="x")
    planner = pipeline.Planner(CONFIG, CATALOG, now_at=NOW)
    known = reported or {}
    return list(
        pipeline.plan_stream(
            stream, planner, lambda runs: {r: known[r] for r in runs if r in known}, batch
        )
    )


def test_duplicate_records_far_apart_are_found_as_latest_records_finds_them(
    small_blocks: None,
) -> None:
    data = capture(300, duplicates=25)
    parsed = parse_sacct(data, cluster="box", source="x")
    kept, dropped = pipeline.latest_records(parsed.records)
    stream = saved_stream(opener(data), cluster="box", source="x")
    lines, skipped = pipeline.duplicate_records(stream)
    assert skipped == dropped
    assert len(dropped) >= 20
    by_run = {r.run: r.line for r in kept}
    assert lines == {run: by_run[run] for run in lines}
    assert set(lines) == {s.run for s in dropped}


def test_false_candidates_of_the_filter_change_nothing(
    monkeypatch: pytest.MonkeyPatch, small_blocks: None
) -> None:
    data = capture(200, duplicates=10)
    stream = saved_stream(opener(data), cluster="box", source="x")
    found = pipeline.duplicate_records(stream)
    monkeypatch.setattr(inputs, "_SEEN_BITS", 8)  # every id a candidate
    assert pipeline.duplicate_records(stream) == found


def test_without_duplicates_the_second_pass_is_skipped(small_blocks: None) -> None:
    stream = saved_stream(opener(capture(200)), cluster="box", source="x")
    assert pipeline.duplicate_records(stream) == ({}, [])


# --- planning in batches ---------------------------------------------------------------------


def joined(plans: list[pipeline.Plan]) -> pipeline.Plan:
    """The plans of the batches as one, the reader's rejected records first."""
    merged = pipeline.merge_plans(plans)
    read = [r for p in plans for r in p.rejected[: p.read_rejected]]
    planned = [r for p in plans for r in p.rejected[p.read_rejected :]]
    return pipeline.Plan(
        **{
            **{f: getattr(merged, f) for f in merged.__dataclass_fields__},
            "rejected": (*read, *planned),
            "read_rejected": len(read),
        }
    )


@pytest.mark.parametrize("trailing", [False, True])
def test_a_capture_planned_in_batches_plans_as_it_does_whole(
    small_blocks: None, trailing: bool
) -> None:
    data = capture(500, trailing=trailing)
    plans = streamed(data)
    assert len(plans) > 5
    assert all(len(p.events) <= 37 * 4 for p in plans)
    one = joined(plans)
    whole = whole_plan(data)
    assert one.events == whole.events
    assert one.skipped == whole.skipped
    assert one.rejected == whole.rejected
    assert (one.records, one.steps_ignored, one.held) == (
        whole.records,
        whole.steps_ignored,
        whole.held,
    )
    assert one.rating_problems == whole.rating_problems
    assert one.checked_runs == whole.checked_runs
    assert len(whole.events) > 200 and whole.held and whole.rating_problems
    assert 0 < whole.read_rejected < len(whole.rejected)  # refused by the reader and the planner


def test_batches_look_up_what_was_reported(small_blocks: None) -> None:
    data = capture(200, noise=False)
    parsed = parse_sacct(data, cluster="box", source="x")
    reported = {r.run: r.elapsed_s // 2 for r in parsed.records[::3]}
    one = joined(streamed(data, reported=reported))
    whole = whole_plan(data, reported)
    assert one.events == whole.events
    assert one.final_seen == whole.final_seen
    assert one.corrections == whole.corrections


def test_with_duplicates_the_same_records_are_planned(small_blocks: None) -> None:
    data = capture(300, duplicates=25)
    one = joined(streamed(data))
    whole = whole_plan(data)
    # the kept record of a duplicated run is planned where it is, not at the run's first
    # record: the same events, maybe in another order
    assert sorted(e.event_key for e in one.events) == sorted(e.event_key for e in whole.events)
    assert sorted(one.events, key=lambda e: e.event_key) == sorted(
        whole.events, key=lambda e: e.event_key
    )
    assert one.skipped[:25] == whole.skipped[:25]  # the duplicates' Skipped first
    assert sorted(map(repr, one.skipped)) == sorted(map(repr, whole.skipped))
    assert one.records == whole.records == len(parse_sacct(data, cluster="box").records)


# --- output ----------------------------------------------------------------------------------


def test_the_json_written_batch_by_batch_is_json_dumps_of_the_whole_plan(
    small_blocks: None,
) -> None:
    data = capture(400, duplicates=5)
    window = pipeline.Window(NOW - timedelta(days=1), NOW)
    whole = joined(streamed(data))
    expected = json.dumps(report.plan_json(whole, pipeline.totals(whole.events), window), indent=2)
    out = io.StringIO()
    report.write_plan_json(iter(streamed(data)), window, out)
    assert out.getvalue() == expected + "\n"
    empty = io.StringIO()
    report.write_plan_json([pipeline.Plan((), (), ())], None, empty)
    assert (
        empty.getvalue()
        == json.dumps(report.plan_json(pipeline.Plan((), (), ()), [], None), indent=2) + "\n"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=12,
    )
)
def test_the_json_encoder_of_the_stream_is_json_dumps_with_indent(value: Any) -> None:
    assert report._json_value(value, "") == json.dumps(value, indent=2)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(), st.text() | st.integers(), max_size=6), st.text(), st.text())
def test_an_event_is_written_as_json_dumps_writes_it(
    metadata: dict[str, Any], user: str, sku: str
) -> None:
    data = capture(3, noise=False)
    event = next(e for e in whole_plan(data).events if e.rated is not None)
    for rated in (event.rated, None):
        changed = PlannedEvent(
            **{
                **{f: getattr(event, f) for f in event.__dataclass_fields__},
                "metadata": metadata,
                "user": user,
                "sku": sku,
                "rated": rated,
            }
        )
        assert report._event_text(changed) == report._json_value(report.event_json(changed), "    ")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_table_made_batch_by_batch_is_the_table_of_the_whole_plan(
    small_blocks: None, verbose: bool
) -> None:
    data = capture(500, duplicates=3)
    whole = joined(streamed(data))
    expected = report.plan_text(
        whole, pipeline.totals(whole.events), None, source="x", verbose=verbose
    )
    summary = report.summarize(iter(streamed(data)), verbose=verbose)
    assert report.summary_text(summary, None, source="x") == expected
    assert "more lines" in expected or verbose


def test_the_cli_dry_run_reads_standard_input_in_blocks(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "cluster: box\nstate_file: " + str(tmp_path / "state.db") + "\n"
        "accounts: {map: {physics: phys, chemistry: chem}}\n"
        "partitions: {map: {compute: CPU_HOUR, gpu: [{sku: GPU_HOUR, metric: gpu}]}}\n"
    )
    args = ["sync", "--config", str(config), "--dry-run", "--now", "2026-07-12T00:00:00Z"]
    for rows in (3, 300):  # a small input stays in the spool's buffer unless flushed
        data = capture(rows, trailing=True, noise=False)
        (tmp_path / "capture.txt").write_bytes(data)
        from_file = cli_runner().invoke(
            main, [*args, "--sacct-file", str(tmp_path / "capture.txt"), "--output", "json"]
        )
        from_stdin = cli_runner().invoke(
            main, [*args, "--sacct-file", "-", "--output", "json"], input=data
        )
        assert from_file.exit_code == 0, from_file.output
        assert from_stdin.exit_code == 0, from_stdin.output
        assert from_file.stdout == from_stdin.stdout
        assert json.loads(from_file.stdout)["counts"]["records"] == rows


# --- the real sync: batches committed one by one ---------------------------------------------


class Crash(Exception):
    pass


def crashing(plans: Iterator[pipeline.Plan], after: int) -> Iterator[pipeline.Plan]:
    for index, plan in enumerate(plans):
        if index == after:
            raise Crash("killed between two batches")
        yield plan


def outbox(store: State) -> dict[str, str]:
    return {r.event_key: str(r.quantity) for r in store.outbox()}


def sync_plans(data: bytes, store: State, batch: int = 37) -> Iterator[pipeline.Plan]:
    stream = saved_stream(opener(data), cluster="box", source="x")
    planner = pipeline.Planner(CONFIG, CATALOG, now_at=NOW)
    return pipeline.plan_stream(stream, planner, store.reported, batch)


def test_batches_are_committed_one_by_one_and_the_mark_moves_with_the_last(
    tmp_path: Path, small_blocks: None
) -> None:
    data = capture(300, duplicates=10)
    mark = NOW - timedelta(hours=1)
    with State.open(tmp_path / "whole.db") as whole:
        pipeline.commit(whole, whole_plan(data), NOW, mark)
        expected = outbox(whole)
    with State.open(tmp_path / "batches.db") as store:
        plan, new = pipeline.commit_stream(store, sync_plans(data, store), NOW, mark)
        assert outbox(store) == expected
        assert new == len(expected)
        assert store.high_water_at() == mark
        assert plan.events == () and plan.records == whole_plan(data).records > 310
        assert len(plan.skipped) == len(whole_plan(data).skipped)


@pytest.mark.parametrize("after", [1, 3, 6])
def test_a_crash_between_batches_bills_nothing_twice(
    tmp_path: Path, small_blocks: None, after: int
) -> None:
    data = capture(300, noise=False)
    mark = NOW - timedelta(hours=1)
    with State.open(tmp_path / "whole.db") as whole:
        pipeline.commit(whole, whole_plan(data), NOW, mark)
        expected = outbox(whole)
    with State.open(tmp_path / "batches.db") as store:
        with pytest.raises(Crash):
            pipeline.commit_stream(store, crashing(sync_plans(data, store), after), NOW, mark)
        assert store.high_water_at() is None  # the next sync reads the same window again
        partial = outbox(store)
        assert (not partial) == (after == 1)  # a batch waits for the next one
        assert len(partial) < len(expected)
        assert partial.items() <= expected.items()
        _, new = pipeline.commit_stream(store, sync_plans(data, store), NOW, mark)
        assert outbox(store) == expected  # each event once, none lost
        assert new == len(expected) - len(partial)
        assert store.high_water_at() == mark


def test_the_pipeline_benchmark_runs() -> None:
    """A smoke run of benchmarks/bench_pipeline.py (seconds): it runs and prints its figures;
    no timing is asserted (shared, noisy machines)."""
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_pipeline.py", "300", "--output", "table", "json"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:4] == ["rows", "output", "agent", "s"]
    assert [row.split()[:2] for row in rows[:2]] == [["300", "table"], ["300", "json"]]
    assert rows[2].split()[0] == "skel." and "skeleton_pass" in rows[2]  # the second reference
    assert len(rows) == 3
