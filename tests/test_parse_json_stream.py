"""``sacct --json`` read job by job (issue 10): the same records, rejections and errors as reading
the whole document with ``json.loads``, in memory bounded by the largest job, not the file."""

from __future__ import annotations

import copy
import io
import json
import logging
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import parse_json, parse_stream, pipeline
from slurm_tracker.errors import InputError
from slurm_tracker.models import JobRecord, ParseResult, Rejected
from slurm_tracker.parse import parse_sacct, saved_stream
from slurm_tracker.parse_fields import _snippet
from slurm_tracker.parse_json import job_item, job_steps
from tests.conftest import REPO
from tests.test_streaming import CATALOG, CONFIG, joined

BOX = (REPO / "tests/data/sacct-box-22.05.json").read_bytes()
BOX_JOBS: list[Any] = json.loads(BOX)["jobs"]
LATER = datetime(2027, 1, 1, tzinfo=timezone.utc)  # after the box's jobs


def reference(data: bytes, *, cluster: str = "box", source: str = "F") -> ParseResult:
    """The reader before issue 10: the whole document through json.loads, then job by job."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(
            f"{source}: starts with '{{' but is not valid JSON ({exc}); expected the output of "
            "sacct --json or a slurmrestd /slurmdb jobs response"
        ) from exc
    jobs = document.get("jobs") if isinstance(document, dict) else None
    if not isinstance(jobs, list):
        errors = document.get("errors") if isinstance(document, dict) else None
        detail = f" (its errors: {_snippet(json.dumps(errors))})" if errors else ""
        raise InputError(
            f'{source}: JSON without a "jobs" list{detail}; expected the output of sacct '
            "--json or a slurmrestd /slurmdb jobs response"
        )
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    steps = 0
    for index, job in enumerate(jobs, start=1):
        steps += job_steps(job)
        item = job_item(job, index=index, cluster=cluster)
        if isinstance(item, JobRecord):
            records.append(item)
        else:
            rejected.append(item)
    return ParseResult(tuple(records), tuple(rejected), steps)


Outcome = Union[ParseResult, str]


def outcome(read: Callable[[], ParseResult]) -> Outcome:
    try:
        return read()
    except InputError as exc:
        return str(exc)


def opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)


def streamed(data: bytes) -> ParseResult:
    """What a saved JSON capture streams, as one ParseResult."""
    stream = saved_stream(opener(data), cluster="box", source="F")
    assert isinstance(stream, parse_stream._JsonStream)
    found = list(stream.items())
    return ParseResult(
        records=tuple(i for i in found if isinstance(i, JobRecord)),
        rejected=tuple(i for i in found if isinstance(i, Rejected)),
        steps_ignored=sum(i is None for i in found),
    )


def read_both_ways(
    data: bytes, block: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Outcome, Outcome, Outcome]:
    """(the reference, parse_sacct, the saved stream), the document cut in ``block`` bytes."""
    monkeypatch.setattr(parse_json, "_BLOCK_BYTES", block)
    monkeypatch.setattr(parse_stream, "BLOCK_BYTES", block)
    return (
        outcome(lambda: reference(data)),
        outcome(lambda: parse_sacct(data, cluster="box", source="F")),
        outcome(lambda: streamed(data)),
    )


BROKEN = [
    BOX[:100],
    BOX[: len(BOX) // 2],
    BOX[:-1],
    BOX[:-3],
    BOX.replace(b",", b"", 1),
    BOX.replace(b"}", b"},", 1),
    BOX + b" x",
    BOX + b"\n\n{}",
    b'{"jobs": [1,]}',
    b'{"jobs": [1,\n\n]}',
    b'{"jobs": [1 2]}',
    b'{"a":1,}',
    b'{"a" 1}',
    b"{1:2}",
    b'{"jobs": []',
    b'{"jobs": [] , }',
    b'{"jobs": null}',
    b'{"errors": ["boom"], "jobs": 3}',
    b'{"jobs": {"a": 1}}',
    b'{"x": [1,2,3',
    b'{"x": "abc',
    b'\x0c{"jobs": []}',
    b'{"jobs": ["\xff"]}',
    b'{"jobs": [1, 2, "\xe2\x82"]}',
    b'{"jobs": [tru]}',
    b'{"jobs": [-]}',
    b'{"jobs": [1.]}',
    b'{"jobs": ["a\tb"]}',
    b'{"jobs": ["\\x"]}',
    b'{"jobs": [{"job_id": 1,}]}',
    b'{"jobs": [1]  } \n\n x',
    b'{"jobs":[]}garbage\xff',
    # a decoding error anywhere wins over a syntax error before it (json.loads decodes first)
    b'{"jobs": [1 2, ' + b'"abc", ' * 200 + b'"\xff"]}',
    b'{"jobs": []}garbage' + b" " * 500 + b"\xe2\x82",
    b'{"jobs": [1]}\x00',
    b'{"jobs": [' + b"1" * 5000 + b"]}",  # too long an integer for Python
    b'{"jobs": [' + b"[" * 3000 + b"]}",  # too deep
]
GOOD = [
    BOX,
    b'{"jobs": [1]  } \n\n ',
    b'{\n"jobs"\n:\n[\n]\n,\n"errors":[]}',
    b"{}",
    b"{ }",
    b'{"jobs": [-Infinity, NaN, 1e5, 1.5, -0, 12345678901234567890]}',
    b'{"jobs": ["\\ud800", "\xed\xa0\x80", "\xc3\xa9\\u00e9"]}',
    b'{"jobs": [{"job_id": 5}], "jobs": []}',  # json.loads keeps the last "jobs"
    b'{"jobs": [], "jobs": [{"job_id": 5}]}',
    b'{"jobs": [{"job_id": 5}], "jobs": 7}',
    b'{"errors": [{"error": "partial"}], "jobs": [{"job_id": 5, "steps": [1, 2]}]}',
    b'\xef\xbb\xbf  \n{"jobs": [{"job_id": 7}]}',
    '{"jobs": [{"job_id": 1}]}'.encode("utf-16-le"),  # json.loads detects it
    json.dumps({"meta": {"x": "é" * 300}, "jobs": BOX_JOBS}, ensure_ascii=False).encode(),
]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 20])
def test_documents_read_in_blocks_read_as_json_loads_reads_them(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    for data in GOOD + BROKEN:
        expected, whole, stream = read_both_ways(data, block, monkeypatch)
        assert whole == expected, data[:80]
        assert stream == expected, data[:80]
    assert isinstance(read_both_ways(BOX, block, monkeypatch)[0], ParseResult)
    errors = [read_both_ways(data, block, monkeypatch)[0] for data in BROKEN]
    assert all(isinstance(e, str) and e.startswith("F: ") for e in errors)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
_JOBS = st.lists(st.sampled_from(BOX_JOBS) | _VALUES, max_size=6)
_MEMBERS = st.lists(
    st.tuples(st.sampled_from(["jobs", "meta", "errors", "warnings", "x"]), _JOBS | _VALUES),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(
    members=_MEMBERS,
    indent=st.sampled_from([None, 0, 1, 2, "\t"]),
    ascii_only=st.booleans(),
    damage=st.sampled_from(["none", "cut", "insert", "delete"]),
    where=st.floats(0, 1),
    byte=st.sampled_from([*b'{}[],:" x\n\\e1-.', 0xFF, 0xC3]),
    block=st.integers(1, 300),
)
def test_any_document_reads_as_json_loads_reads_it(
    members: list[tuple[str, Any]],
    indent: Union[int, str, None],
    ascii_only: bool,
    damage: str,
    where: float,
    byte: int,
    block: int,
) -> None:
    pairs = ", ".join(
        f"{json.dumps(k)}: {json.dumps(v, indent=indent, ensure_ascii=ascii_only)}"
        for k, v in members
    )
    data = ("{" + pairs + "}").encode("utf-8", "surrogatepass")
    at = int(where * len(data))
    if damage == "cut":
        data = data[: max(1, at)]
    elif damage == "insert":
        data = data[:at] + bytes([byte]) + data[at:]
    elif damage == "delete" and at > 0:
        data = data[:at] + data[at + 1 :]
    if not data.lstrip().startswith(b"{"):
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        expected, whole, stream = read_both_ways(data, block, monkeypatch)
    assert whole == expected
    assert stream == expected


def test_the_public_json_captures_read_as_before(
    public_fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted(public_fixtures.glob("*.json"))
    assert len(paths) >= 6
    for path in paths:
        data = path.read_bytes()
        for block in (5, 4096, 1 << 20):
            expected, whole, stream = read_both_ways(data, block, monkeypatch)
            assert isinstance(expected, ParseResult), path
            assert whole == expected, path
            assert stream == expected, path
        assert isinstance(expected, ParseResult)
        assert expected.records or expected.rejected, path


def test_a_broken_document_is_refused_when_opened(tmp_path: Path) -> None:
    """Before anything is read from it (a sync compares the API's record and commits after)."""
    path = tmp_path / "capture.json"
    path.write_bytes(BOX[:-10])
    with pytest.raises(InputError) as caught:
        saved_stream(lambda: path.open("rb"), cluster="box", source=str(path))
    assert str(caught.value).startswith(f"{path}: starts with '{{' but is not valid JSON")
    with pytest.raises(InputError) as expected:
        reference(BOX[:-10], source=str(path))
    assert str(caught.value) == str(expected.value)


def test_the_errors_a_document_reports_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    data = b'{"errors": [{"error": "partial answer"}], "jobs": [{"job_id": 5}]}'
    with caplog.at_level(logging.WARNING):
        stream = saved_stream(opener(data), cluster="box", source="F")
        list(stream.items())
        list(stream.items())
    warned = [r.getMessage() for r in caplog.records if "reports errors" in r.getMessage()]
    assert warned == ['F: the JSON reports errors: [{"error": "partial answer"}]']


def big_document(jobs: int) -> bytes:
    made = []
    for i in range(jobs):
        job = copy.deepcopy(BOX_JOBS[i % len(BOX_JOBS)])
        job["job_id"] = 100_000 + i
        made.append(job)
    return json.dumps({"meta": {}, "errors": [], "jobs": made}, indent=2).encode()


def test_a_large_document_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "capture.json"
    path.write_bytes(big_document(6000))
    size = path.stat().st_size
    assert size > 18_000_000
    tracemalloc.start()
    try:
        stream = saved_stream(lambda: path.open("rb"), cluster="box", source="x")
        read = sum(1 for item in stream.items() if isinstance(item, JobRecord))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == 6000
    assert peak < 8_000_000, peak  # json.loads of it: about ten times its size
    assert peak < size / 3


def test_a_document_planned_in_batches_plans_as_it_does_whole() -> None:
    jobs = [*BOX_JOBS, *BOX_JOBS[:5], *BOX_JOBS]  # runs written twice, far apart
    data = json.dumps({"jobs": jobs}).encode()
    stream = saved_stream(opener(data), cluster="box", source="x")
    planner = pipeline.Planner(CONFIG, CATALOG, now_at=LATER)
    plans = list(pipeline.plan_stream(stream, planner, lambda _runs: {}, 7))
    assert len(plans) > 3
    one = joined(plans)
    parsed = parse_sacct(data, cluster="box", source="x")
    whole = pipeline.plan_usage(parsed, {}, CONFIG, CATALOG, now_at=LATER)
    assert sorted(one.events, key=lambda e: e.event_key) == sorted(
        whole.events, key=lambda e: e.event_key
    )
    assert sorted(map(repr, one.skipped)) == sorted(map(repr, whole.skipped))
    assert one.records == whole.records == len(jobs)
    assert len(whole.events) > 10 and len(one.skipped) >= len(BOX_JOBS)
