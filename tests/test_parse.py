"""parse.py: field parsers, parsable and JSON input, malformed records, properties."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, Optional

import pytest
from dateutil import tz as dateutil_tz
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.errors import InputError
from slurm_tracker.models import ParseResult, Tres
from slurm_tracker.parse import (
    JobId,
    canonical_field,
    parse_duration,
    parse_job_id,
    parse_sacct,
    parse_state,
    parse_time,
    parse_tres,
)
from slurm_tracker.sacct import CAPTURE_DELIMITER, LIVE_FIELDS

UTC = timezone.utc
CET = timezone(timedelta(hours=1))
D = CAPTURE_DELIMITER


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- field parsers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:00", 0),
        ("00:06:45", 405),
        ("14:00:49", 50449),
        ("01:00:06", 3606),
        ("2-19:05:21", 2 * 86400 + 19 * 3600 + 5 * 60 + 21),
        ("3-00:00:00", 259200),
        ("40-02:15:42", 40 * 86400 + 2 * 3600 + 15 * 60 + 42),
        ("22-08:05:48", 22 * 86400 + 8 * 3600 + 5 * 60 + 48),
        ("01:00", 60),  # MM:SS
        ("59:59", 3599),
        ("21:33.052", 21 * 60 + 33),  # CPU times: MM:SS.mmm
        ("00:16.070", 16),
        ("11:06:33.5", 11 * 3600 + 6 * 60 + 33),
        ("1-02", 86400 + 2 * 3600),  # D-HH
        ("1-02:03", 86400 + 2 * 3600 + 3 * 60),  # D-HH:MM
        (" 00:01:01 ", 61),
        ("UNLIMITED", None),
        ("INVALID", None),
        ("Partition_Limit", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_duration(text: str, seconds: Optional[int]) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "5",
        "1.5",
        "-1",
        "1:2:3:4",
        "00:60:00",
        "00:00:60",
        "1-24:00:00",
        "1-",
        "-00:01",
        "1-02:03.5",
        "\u0663:00",
        "12:00:00x",
        "Unknown",
    ],
)
def test_parse_duration_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


OSLO = dateutil_tz.gettz("Europe/Oslo")


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("1680193504", UTC, utc(2023, 3, 30, 16, 25, 4)),
        ("1680193504", CET, utc(2023, 3, 30, 16, 25, 4)),  # epochs ignore the zone
        ("2019-12-03T10:00:00", UTC, utc(2019, 12, 3, 10)),
        ("2019-12-03T10:00:00", CET, utc(2019, 12, 3, 9)),
        ("2019-12-03 10:00:00", UTC, utc(2019, 12, 3, 10)),
        ("2019-12-03T10:00", UTC, utc(2019, 12, 3, 10)),
        ("2019-12-03T10:00:00.250000", UTC, datetime(2019, 12, 3, 10, 0, 0, 250000, UTC)),
        ("2019-12-03T10:00:00+01:00", UTC, utc(2019, 12, 3, 9)),
        ("2019-12-03T10:00:00-0230", UTC, utc(2019, 12, 3, 12, 30)),
        ("2019-12-03T10:00:00Z", CET, utc(2019, 12, 3, 10)),
        ("2019-07-03T10:00:00", OSLO, utc(2019, 7, 3, 8)),  # CEST
        ("2019-12-03T10:00:00", OSLO, utc(2019, 12, 3, 9)),  # CET
        # 02:30 happened twice on 2024-10-27 in Oslo: the first (still CEST) is chosen.
        ("2024-10-27T02:30:00", OSLO, utc(2024, 10, 27, 0, 30)),
        ("Unknown", UTC, None),
        ("None", UTC, None),
        ("0", UTC, None),  # epoch 0 means "not set"
        ("", UTC, None),
        ("  ", UTC, None),
    ],
)
def test_parse_time(text: str, zone: tzinfo, expected: Optional[datetime]) -> None:
    got = parse_time(text, zone)
    assert got == expected
    if got is not None:
        assert got.utcoffset() == timedelta(0)


def test_parse_time_ambiguous_hour_with_zoneinfo() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        oslo = zoneinfo.ZoneInfo("Europe/Oslo")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    assert parse_time("2024-10-27T02:30:00", oslo) == utc(2024, 10, 27, 0, 30)
    assert parse_time("2024-10-27T03:30:00", oslo) == utc(2024, 10, 27, 2, 30)


@pytest.mark.parametrize(
    "text",
    [
        "Ystday 10:00",
        "Mon 12:34",
        "25 Apr",
        "6 Jun 2012",
        "12:34:56",
        "2019-13-01T00:00:00",
        "2019-02-30T00:00:00",
        "2019-12-03T25:00:00",
        "2019-12-03",
        "-5",
        "1.5",
        "99999999999999999999",
        "2019-12-03T10:00:00+25:00",
        "\u0661\u0662\u0663",
    ],
)
def test_parse_time_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text, UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Tres()),
        (
            "billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1",
            Tres(cpu=48, mem_mb=Decimal(393216), node=1, gpu=4, billing=78),
        ),
        ("gres/gpu:a100=1,gres/gpu=1", Tres(gpu=1)),  # typed + untyped: not added up
        ("gres/gpu=1,gres/gpu:a100=1", Tres(gpu=1)),  # in any order
        ("gres/gpu:a100=2,gres/gpu:v100=1", Tres(gpu=3)),  # typed only: summed
        ("gres/gpu:A100_80=4", Tres(gpu=4)),
        ("mem=62.50G", Tres(mem_mb=Decimal(64000))),
        ("mem=7996M", Tres(mem_mb=Decimal(7996))),
        ("mem=1024K", Tres(mem_mb=Decimal(1))),
        ("mem=512K", Tres(mem_mb=Decimal("0.5"))),
        ("mem=1T", Tres(mem_mb=Decimal(1048576))),
        ("mem=0.5P", Tres(mem_mb=Decimal(536870912))),
        ("mem=512", Tres(mem_mb=Decimal(512))),  # no unit: MiB
        ("cpu=2,energy=5,fs/disk=100,gres/gpumem=40G,license/x=1,bb/datawarp=1G", Tres(cpu=2)),
        (" cpu=1 , node=2 ", Tres(cpu=1, node=2)),
    ],
)
def test_parse_tres(text: str, expected: Tres) -> None:
    assert parse_tres(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "cpu",
        "cpu=",
        "cpu=abc",
        "cpu=-1",
        "cpu=1.5",
        "=5",
        "cpu=1,,node=1",
        "cpu=1,cpu=2",
        "mem=12X",
        "mem=G",
        "gres/gpu=1.5",
        "gres/gpu:a100=x",
        "cpu=4294967294",
        "node=\u0663",
    ],
)
def test_parse_tres_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_tres(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", JobId("123", 123)),
        ("123_4", JobId("123_4", 123, array_task=4)),
        ("123_[1-5%2]", JobId("123_[1-5%2]", 123, array_spec="1-5%2")),
        ("26735347_[76-999]", JobId("26735347_[76-999]", 26735347, array_spec="76-999")),
        ("30166062_[1]", JobId("30166062_[1]", 30166062, array_spec="1")),
        ("123+0", JobId("123+0", 123, het_offset=0)),
        ("123.batch", JobId("123.batch", 123, step="batch")),
        ("123.extern", JobId("123.extern", 123, step="extern")),
        ("123.0", JobId("123.0", 123, step="0")),
        ("123_4.batch", JobId("123_4.batch", 123, array_task=4, step="batch")),
        ("123+1.0", JobId("123+1.0", 123, het_offset=1, step="0")),
        (" 42 ", JobId("42", 42)),
    ],
)
def test_parse_job_id(text: str, expected: JobId) -> None:
    parsed = parse_job_id(text)
    assert parsed == expected
    assert parsed.is_step == (expected.step is not None)
    assert parsed.is_pending_array == (expected.array_spec is not None)


@pytest.mark.parametrize("text", ["", "abc", "123_", "12 3", "123.", "_4", "123_[]", "\u0661"])
def test_parse_job_id_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_job_id(text)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("COMPLETED", "COMPLETED"),
        ("CANCELLED by 2101037", "CANCELLED"),
        ("cancelled", "CANCELLED"),
        ("OUT_OF_MEMORY", "OUT_OF_MEMORY"),
        ("A_STATE_FROM_SLURM_30", "A_STATE_FROM_SLURM_30"),
        ("", ""),
        ("  ", ""),
    ],
)
def test_parse_state(text: str, state: str) -> None:
    assert parse_state(text) == state


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("jobidraw", "JobIDRaw"),
        ("ALLOCTRES", "AllocTRES"),
        ("JobName%30", "JobName"),
        (" elapsed ", "Elapsed"),
        ("SomethingNew", "SomethingNew"),
    ],
)
def test_canonical_field(name: str, canonical: str) -> None:
    assert canonical_field(name) == canonical


# --- parsable input --------------------------------------------------------------------------

ROW = {
    "Cluster": "hpc",
    "JobID": "100",
    "JobIDRaw": "100",
    "Account": "physics",
    "Partition": "compute",
    "User": "alice",
    "Group": "alice",
    "QOS": "normal",
    "Submit": "1767225600",  # 2026-01-01T00:00:00Z
    "Eligible": "1767225600",
    "Start": "1767225660",
    "End": "1767229260",
    "ElapsedRaw": "3600",
    "State": "COMPLETED",
    "ExitCode": "0:0",
    "AllocTRES": "billing=4,cpu=4,mem=8G,node=1",
    "NNodes": "1",
    "NodeList": "cn1",
    "Reservation": "",
    "JobName": "job",
}


def row(**changes: str) -> dict[str, str]:
    return {**ROW, **changes}


def render(
    rows: Sequence[Mapping[str, str]],
    fields: Sequence[str] = LIVE_FIELDS,
    delimiter: str = CAPTURE_DELIMITER,
    trailing: bool = True,
    header: bool = True,
) -> bytes:
    """sacct parsable output: -p (trailing delimiter) or -P."""
    end = delimiter if trailing else ""
    lines = [delimiter.join(fields) + end] if header else []
    lines += [delimiter.join(r[f] for f in fields) + end for r in rows]
    return "".join(line + "\n" for line in lines).encode()


def parse(data: bytes, **kwargs: Any) -> ParseResult:
    kwargs.setdefault("cluster", "default-cluster")
    return parse_sacct(data, **kwargs)


def test_live_format_record() -> None:
    result = parse(render([ROW]))
    assert result.rejected == ()
    assert result.steps_ignored == 0
    (record,) = result.records
    assert record.cluster == "hpc"
    assert record.job_id == record.job_id_raw == "100"
    assert record.submit_at == utc(2026, 1, 1)
    assert record.start_at == utc(2026, 1, 1, 0, 1)
    assert record.end_at == utc(2026, 1, 1, 1, 1)
    assert record.elapsed_s == 3600
    assert record.state == "COMPLETED"
    assert (record.account, record.partition, record.user) == ("physics", "compute", "alice")
    assert record.tres == Tres(cpu=4, mem_mb=Decimal(8192), node=1, billing=4)
    assert record.job_name == "job"
    assert record.line == 2
    assert record.final
    assert dict(record.extra) == {
        "Group": "alice",
        "QOS": "normal",
        "Eligible": "1767225600",
        "ExitCode": "0:0",
        "NNodes": "1",
        "NodeList": "cn1",
        "Reservation": "",
    }


@pytest.mark.parametrize(
    "name",
    [
        "a|b",
        "a|#b",
        "a|#",
        "|#",
        "#|",
        "ends with |",
        "two\nlines",
        "\nstarts with a newline",
        "#|\nsneaky",
        "\n",
        "\n\n",
        "tab\there",
        "ünïcødé ✓ 名前",
        "",
        "   ",
        "x|\ny",
    ],
)
def test_live_format_job_names_with_delimiters_and_newlines(name: str) -> None:
    rows = [row(JobID="1", JobIDRaw="1"), row(JobID="2", JobIDRaw="2", JobName=name), row()]
    data = render(rows)
    result = parse(data)
    assert result.rejected == ()
    assert [r.job_name for r in result.records] == ["job", name, "job"]
    assert [r.line for r in result.records] == [2, 3, 4 + name.count("\n")]


def test_fields_in_any_order_with_extra_fields_and_lowercase_names() -> None:
    fields = [
        "elapsedraw",
        "MaxRSS",
        "jobname",
        "SUBMIT",
        "Start",
        "end",
        "jobidraw",
        "JobID",
        "AllocTRES",
        "account",
        "Comment",
        "State",
        "user",
        "partition",
    ]
    source = {**ROW, "MaxRSS": "12K", "Comment": "a comment"}
    values = {f: source[canonical_field(f)] for f in fields}
    data = render([values], fields=fields, delimiter="|", trailing=False)
    (record,) = parse(data).records
    assert record.cluster == "default-cluster"  # no Cluster column
    assert record.elapsed_s == 3600
    assert record.submit_at == utc(2026, 1, 1)
    assert record.account == "physics"
    assert record.extra == {"MaxRSS": "12K", "Comment": "a comment"}


@pytest.mark.parametrize(
    ("delimiter", "trailing"),
    [("|", True), ("|", False), ("\t", False), (CAPTURE_DELIMITER, False), ("\t", True)],
)
def test_delimiters_detected_from_the_header(delimiter: str, trailing: bool) -> None:
    result = parse(
        render([ROW, row(JobID="101", JobIDRaw="101")], delimiter=delimiter, trailing=trailing)
    )
    assert [r.job_id for r in result.records] == ["100", "101"]
    assert result.rejected == ()


def test_parsable2_pipe_in_last_job_name_is_rejoined() -> None:
    data = render([row(JobName="a|b||c")], delimiter="|", trailing=False)
    (record,) = parse(data).records
    assert record.job_name == "a|b||c"


def test_parsable2_newline_in_last_job_name_is_rejoined() -> None:
    data = render(
        [row(JobName="first\nsecond"), row(JobID="7", JobIDRaw="7")], delimiter="|", trailing=False
    )
    result = parse(data)
    assert [r.job_name for r in result.records] == ["first\nsecond", "job"]
    assert [r.line for r in result.records] == [2, 4]


def test_parsable2_pipe_in_a_middle_field_is_rejected() -> None:
    fields = ["JobID", "JobName", "Submit", "Start", "End", "ElapsedRaw", "AllocTRES", "State"]
    data = render(
        [row(JobName="a|b"), row(JobID="7")], fields=fields, delimiter="|", trailing=False
    )
    result = parse(data)
    assert [r.job_id for r in result.records] == ["7"]
    (rejected,) = result.rejected
    assert rejected.line == 2
    assert "expected 8 fields" in rejected.reason
    assert "found 9" in rejected.reason


@pytest.mark.parametrize("data", [b"", b"   ", b"\n\n", b" \t\r\n "])
def test_empty_input_is_an_empty_result(data: bytes) -> None:
    assert parse(data) == ParseResult(records=(), rejected=(), steps_ignored=0)


@pytest.mark.parametrize("trailing", [True, False])
def test_header_only(trailing: bool) -> None:
    assert parse(render([], trailing=trailing)) == ParseResult((), (), 0)


def test_steps_are_counted_not_returned() -> None:
    rows = [
        row(JobID=i, JobIDRaw=i)
        for i in ("5", "5.batch", "5.extern", "5.0", "6_1", "6_1.batch", "7+0", "7+0.0")
    ]
    result = parse(render(rows))
    assert [r.job_id for r in result.records] == ["5", "6_1", "7+0"]
    assert result.steps_ignored == 5


def test_array_and_het_jobs_keep_display_and_raw_ids() -> None:
    rows = [
        row(JobID="6_1", JobIDRaw="9"),
        row(
            JobID="6_[2-5%2]",
            JobIDRaw="6",
            Start="Unknown",
            End="Unknown",
            ElapsedRaw="0",
            AllocTRES="",
        ),
        row(JobID="7+1", JobIDRaw="11"),
    ]
    records = parse(render(rows)).records
    assert [(r.job_id, r.job_id_raw) for r in records] == [
        ("6_1", "9"),
        ("6_[2-5%2]", "6"),
        ("7+1", "11"),
    ]


def test_pending_and_running_runs_are_records() -> None:
    rows = [
        row(
            JobID="1",
            State="PENDING",
            Start="Unknown",
            End="Unknown",
            ElapsedRaw="0",
            AllocTRES="",
            NodeList="None assigned",
        ),
        row(JobID="2", State="RUNNING", End="Unknown", ElapsedRaw="120"),
        row(JobID="3", State="CANCELLED by 1000", Start="None", ElapsedRaw="0", AllocTRES=""),
    ]
    pending, running, cancelled = parse(render(rows)).records
    assert (pending.start_at, pending.end_at, pending.elapsed_s) == (None, None, 0)
    assert pending.tres == Tres()
    assert not pending.final
    assert (running.end_at, running.elapsed_s, running.final) == (None, 120, False)
    assert (cancelled.state, cancelled.start_at, cancelled.elapsed_s) == ("CANCELLED", None, 0)
    assert cancelled.final


def test_unknown_states_are_accepted() -> None:
    (record,) = parse(render([row(State="SOMETHING_NEW by 5")])).records
    assert record.state == "SOMETHING_NEW"


def test_empty_cluster_column_falls_back_to_the_argument() -> None:
    (record,) = parse(render([row(Cluster="")]), cluster="here").records
    assert record.cluster == "here"


def test_elapsed_and_cpus_fallbacks_without_elapsedraw_and_alloctres() -> None:
    fields = ["JobID", "Submit", "Start", "End", "Elapsed", "AllocCPUS", "NNodes", "JobName"]
    values = row(Elapsed="1-00:00:01", AllocCPUS="8", NNodes="2")
    (record,) = parse(render([values], fields=fields)).records
    assert record.elapsed_s == 86401
    assert record.tres == Tres(cpu=8, node=2)
    assert record.job_id_raw == "100"  # JobID stands in for JobIDRaw


def test_ncpus_fallback() -> None:
    fields = ["JobIDRaw", "Submit", "Start", "End", "ElapsedRaw", "NCPUS"]
    (record,) = parse(render([row(NCPUS="3")], fields=fields)).records
    assert record.tres == Tres(cpu=3)


def test_naive_times_are_read_in_the_given_zone() -> None:
    values = row(
        Submit="2026-01-01T01:00:00", Start="2026-01-01T01:00:00", End="2026-01-01T02:00:00"
    )
    (record,) = parse(render([values]), tz=CET).records
    assert record.submit_at == utc(2026, 1, 1)
    assert record.end_at == utc(2026, 1, 1, 1)


def test_headerless_input_needs_the_field_list() -> None:
    data = render([ROW], header=False)
    with pytest.raises(InputError) as caught:
        parse(data, source="saved.txt")
    message = str(caught.value)
    assert "saved.txt:1" in message
    assert "--sacct-fields JobID,JobIDRaw" in message


@pytest.mark.parametrize(
    ("delimiter", "trailing"), [("|", False), ("|", True), (CAPTURE_DELIMITER, True), ("\t", False)]
)
def test_headerless_input_with_fields(delimiter: str, trailing: bool) -> None:
    rows = [ROW, row(JobID="101", JobName="a|b")]
    data = render(rows, delimiter=delimiter, trailing=trailing, header=False)
    result = parse(data, fields=list(LIVE_FIELDS))
    assert [r.job_id for r in result.records] == ["100", "101"]
    assert result.records[1].job_name == "a|b"
    assert [r.line for r in result.records] == [1, 2]
    assert parse(data, fields=",".join(LIVE_FIELDS)) == result


def test_a_header_wins_over_the_field_list() -> None:
    result = parse(render([ROW]), fields=["JobID", "Start"])
    assert [r.job_id for r in result.records] == ["100"]


@pytest.mark.parametrize(
    ("fields", "missing"),
    [
        (
            ["JobID", "ExitCode", "State", "MaxRSS", "Elapsed"],
            "Submit, Start, End, AllocTRES (or AllocCPUS/NCPUS)",
        ),
        (["JobName", "Submit", "Start", "End", "ElapsedRaw", "AllocTRES", "JobIDRaw"], None),
        (["JobID", "Submit", "Start", "End", "AllocTRES"], "ElapsedRaw (or Elapsed)"),
    ],
)
def test_missing_columns(fields: list[str], missing: Optional[str]) -> None:
    data = ("|".join(fields) + "\n").encode()
    if missing is None:
        assert parse(data) == ParseResult((), ())
        return
    with pytest.raises(InputError) as caught:
        parse(data, source="old.txt")
    message = str(caught.value)
    assert f"old.txt: the sacct output lacks the column(s) {missing}," in message
    assert "--format=" + ",".join(LIVE_FIELDS) in message


def test_crlf_line_ends() -> None:
    data = render([ROW], delimiter="|", trailing=False).replace(b"\n", b"\r\n")
    (record,) = parse(data).records
    assert record.job_name == "job"


def test_byte_order_mark() -> None:
    (record,) = parse(b"\xef\xbb\xbf" + render([ROW])).records
    assert record.job_id == "100"


GOOD = row(JobID="9", JobIDRaw="9")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (row(ElapsedRaw="-5"), "job 100: ElapsedRaw -5 is negative"),
        (row(ElapsedRaw="400000000"), "job 100: ElapsedRaw 400000000 is more than ten years"),
        (row(ElapsedRaw="12x"), "job 100: ElapsedRaw '12x' is not a plausible number of seconds"),
        (row(ElapsedRaw=""), "job 100: ElapsedRaw is empty although the run started"),
        (row(Submit="Unknown"), "job 100: Submit 'Unknown' is missing"),
        (row(Submit=""), "job 100: Submit '' is missing"),
        (row(Submit="Ystday 10:00"), "job 100: Submit 'Ystday 10:00':"),
        (row(Start="2026-02-30T00:00:00"), "job 100: Start '2026-02-30T00:00:00':"),
        (row(End="99999999999999999999"), "job 100: End '99999999999999999999':"),
        (row(AllocTRES="cpu=x"), "job 100: AllocTRES 'cpu=x':"),
        (row(AllocTRES="cpu=-4"), "job 100: AllocTRES 'cpu=-4':"),
        (row(JobID="", JobIDRaw=""), "no job id"),
        (row(JobID="abc", JobIDRaw="abc"), "JobID 'abc':"),
    ],
)
def test_malformed_records_are_rejected_and_the_run_goes_on(
    bad: dict[str, str], reason: str
) -> None:
    result = parse(render([GOOD, bad, GOOD]))
    assert [r.job_id for r in result.records] == ["9", "9"]
    (rejected,) = result.rejected
    assert rejected.line == 3
    assert reason in rejected.reason
    assert rejected.text.startswith("hpc|#|")


def test_truncated_and_extra_delimiter_records_in_the_live_format() -> None:
    header = D.join(LIVE_FIELDS) + D + "\n"
    good = D.join(GOOD[f] for f in LIVE_FIELDS) + D + "\n"
    short = D.join(GOOD[f] for f in LIVE_FIELDS[:5]) + D + "\n"
    cut = D.join(GOOD[f] for f in LIVE_FIELDS)[:-2]  # output cut off mid-record
    data = (header + good + short + good + cut).encode()
    result = parse(data)
    assert [r.line for r in result.records] == [2, 4]
    assert [(r.line, r.reason[:40]) for r in result.rejected] == [
        (3, "expected 20 fields separated by '|#|' as"),
        (5, "truncated record: it does not end with '"),
    ]


def test_non_utf8_job_name_is_billed_but_other_fields_are_rejected() -> None:
    # Job names belong to users: bad bytes there must not get a record rejected (and so not
    # billed); in a field Slurm controls they mean the record is damaged.
    named = render([GOOD, row(JobName="x"), GOOD]).replace(b"|#|x|#|", b"|#|\xff\xfe|#|")
    result = parse(named)
    assert len(result.records) == 3 and not result.rejected
    assert result.records[1].job_name == "\ufffd\ufffd"
    damaged = render([GOOD, row(Account="physx"), GOOD]).replace(b"physx", b"phys\xff")
    result = parse(damaged)
    assert len(result.records) == 2
    (rejected,) = result.rejected
    assert rejected.line == 3
    assert "Account is not valid UTF-8" in rejected.reason
    assert "\ufffd" in rejected.text


def test_non_utf8_header_is_not_a_header() -> None:
    with pytest.raises(InputError, match="not a sacct header"):
        parse(b"JobID|\xff\n1|2\n")


def test_rejected_text_is_truncated() -> None:
    result = parse(render([row(ElapsedRaw="-1", JobName="n" * 1000)]))
    (rejected,) = result.rejected
    assert 190 <= len(rejected.text) <= 210


# --- JSON input ------------------------------------------------------------------------------


def json_job(**changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_id": 77,
        "cluster": "c",
        "account": "physics",
        "partition": "gpu",
        "user": "bob",
        "name": "train",
        "group": "bob",
        "qos": "normal",
        "nodes": "g1",
        "array": {
            "job_id": 0,
            "task_id": {"set": False, "infinite": False, "number": 0},
            "task": "",
        },
        "het": {"job_id": 0, "job_offset": {"set": False, "infinite": False, "number": 0}},
        "association": {"account": "physics", "cluster": "c", "partition": "", "user": "bob"},
        "state": {"current": ["COMPLETED"], "reason": "None"},
        "time": {
            "elapsed": 60,
            "eligible": 1767225600,
            "submission": 1767225600,
            "start": 1767225601,
            "end": 1767225661,
        },
        "exit_code": {
            "status": ["SUCCESS"],
            "return_code": {"set": True, "number": 2},
            "signal": {"id": {"set": True, "number": 9}, "name": "KILL"},
        },
        "reservation": {"id": 0, "name": ""},
        "steps": [{"step": {"id": "77.batch"}}, {"step": {"id": "77.extern"}}],
        "tres": {
            "allocated": [
                {"type": "cpu", "name": "", "id": 1, "count": 8},
                {"type": "mem", "name": "", "id": 2, "count": 4096},
                {"type": "energy", "name": "", "id": 3, "count": -2},
                {"type": "node", "name": "", "id": 4, "count": 1},
                {"type": "billing", "name": "", "id": 5, "count": 10},
                {"type": "gres", "name": "gpu:a100", "id": 1002, "count": 2},
                {"type": "gres", "name": "gpumem", "id": 1003, "count": 80},
            ]
        },
    }
    job.update(changes)
    return job


def parse_json(*jobs: Any, **kwargs: Any) -> ParseResult:
    return parse(json.dumps({"jobs": list(jobs), "errors": [], "meta": {}}).encode(), **kwargs)


def test_json_job() -> None:
    result = parse_json(json_job())
    assert result.steps_ignored == 2
    (record,) = result.records
    assert (record.cluster, record.job_id, record.job_id_raw) == ("c", "77", "77")
    assert record.submit_at == utc(2026, 1, 1)
    assert record.start_at == utc(2026, 1, 1, 0, 0, 1)
    assert record.end_at == utc(2026, 1, 1, 0, 1, 1)
    assert (record.elapsed_s, record.state) == (60, "COMPLETED")
    assert record.tres == Tres(cpu=8, mem_mb=Decimal(4096), node=1, gpu=2, billing=10)
    assert (record.account, record.partition, record.user, record.job_name) == (
        "physics",
        "gpu",
        "bob",
        "train",
    )
    assert record.line == 1
    assert record.extra["ExitCode"] == "2:9"
    assert record.extra["Eligible"] == "1767225600"
    assert record.extra["QOS"] == "normal"


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"state": {"current": "CANCELLED"}}, "state", "CANCELLED"),  # 21.08: a string
        ({"state": {"current": ["CANCELLED", "REQUEUED"]}}, "state", "CANCELLED"),
        ({"state": {"current": []}}, "state", ""),
        ({"array": {"job_id": 70, "task_id": 7}}, "job_id", "70_7"),
        ({"array": {"job_id": 70, "task_id": {"set": True, "number": 0}}}, "job_id", "70_0"),
        ({"array": {"job_id": 70, "task_id": None, "task": "1-5%2"}}, "job_id", "70_[1-5%2]"),
        ({"het": {"job_id": 76, "job_offset": 1}}, "job_id", "76+1"),
        ({"het": {"job_id": 76, "job_offset": {"set": True, "number": 0}}}, "job_id", "76+0"),
        ({"time": {"elapsed": 5, "submission": 9, "start": 10, "end": 0}}, "end_at", None),
        ({"time": {"elapsed": 0, "submission": 9, "start": 0, "end": 0}}, "start_at", None),
        (
            {
                "time": {
                    "elapsed": {"set": True, "number": 7},
                    "submission": {"set": True, "number": 9},
                    "start": 10,
                    "end": 17,
                }
            },
            "elapsed_s",
            7,
        ),
        ({"cluster": None}, "cluster", "c"),  # from the association
        ({"cluster": "", "association": {}}, "cluster", "default-cluster"),
        ({"account": ""}, "account", "physics"),
        ({"user": None, "association": {"user": "carol"}}, "user", "carol"),
        ({"tres": {"allocated": []}}, "tres", Tres()),
        (
            {
                "tres": {
                    "allocated": [
                        {"type": "gres", "name": "gpu", "count": 1},
                        {"type": "gres", "name": "gpu:a100", "count": 1},
                    ]
                }
            },
            "tres",
            Tres(gpu=1),
        ),
        ({"tres": {"allocated": [{"type": "cpu", "name": None, "count": None}]}}, "tres", Tres()),
        ({"tres": {}}, "tres", Tres()),
    ],
)
def test_json_variants(changes: dict[str, Any], attribute: str, expected: Any) -> None:
    (record,) = parse_json(json_job(**changes)).records
    assert getattr(record, attribute) == expected


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        ("not an object", 'job #2: "not an object" is not a job object'),
        (None, "job #2: null is not a job object"),
        (json_job(job_id=True), "job #2: job_id is true, not an integer"),
        (json_job(job_id=None), "job #2: job_id null is missing"),
        (json_job(time={"submission": 0, "elapsed": 0}), "job #2: job 77: time.submission is"),
        (json_job(time={"submission": "x"}), 'job #2: job 77: time.submission is "x"'),
        (json_job(time={"submission": 5, "start": 6, "elapsed": -1}), "time.elapsed -1 is neg"),
        (json_job(time={"submission": 5, "start": 6, "elapsed": 10**12}), "than ten years"),
        (json_job(time={"submission": 5, "start": 6}), "time.elapsed is empty although"),
        (json_job(time={"submission": 10**30}), "job #2: job 77: time.submission 1000"),
        (json_job(time={"submission": 1.5}), "not an integer"),
        (json_job(tres={"allocated": "cpu=1"}), 'tres.allocated is "cpu=1", not a list'),
        (json_job(tres={"allocated": [5]}), "tres.allocated item 5 is not an object"),
        (json_job(name=["x"]), 'name is ["x"], not a string'),
    ],
)
def test_json_malformed_jobs_are_rejected(job: Any, reason: str) -> None:
    result = parse_json(json_job(job_id=1), job, json_job(job_id=3))
    assert [r.job_id_raw for r in result.records] == ["1", "3"]
    (rejected,) = result.rejected
    assert rejected.line == 2
    assert reason in rejected.reason
    assert len(rejected.text) <= 210


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "saved.json: starts with '{' but is not valid JSON"),
        (b'{"jobs": 5}', 'saved.json: JSON without a "jobs" list'),
        (b'{"errors": [{"error": "boom"}]}', "boom"),
        (b"  {\xff}", "not valid JSON"),
        (b"{" + b"[" * 100000, "not valid JSON"),
    ],
)
def test_json_that_cannot_be_read(data: bytes, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse(data, source="saved.json")
    assert message in str(caught.value)


# --- properties ------------------------------------------------------------------------------

_TOKENS = [
    D,
    "|",
    "\t",
    "\n",
    "{",
    "}",
    "[",
    "]",
    '"',
    ":",
    ",",
    "=",
    "-",
    ".",
    "_",
    "+",
    " ",
    "JobID",
    "JobIDRaw",
    "Submit",
    "Start",
    "End",
    "ElapsedRaw",
    "Elapsed",
    "AllocTRES",
    "State",
    "JobName",
    "Unknown",
    "None",
    "0",
    "1",
    "42",
    "-7",
    "1767225600",
    "2026-01-01T00:00:00",
    "12:00:00",
    "cpu=4",
    "mem=1G",
    "gres/gpu=1",
    '"jobs"',
    "null",
    "true",
    "\xff",
    "é",
]
_token_bytes = st.lists(
    st.one_of(st.sampled_from(_TOKENS).map(str.encode), st.binary(max_size=4)), max_size=40
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=300), _token_bytes),
    fields=st.sampled_from([None, list(LIVE_FIELDS), ["JobID", "Submit"]]),
)
def test_arbitrary_bytes_raise_nothing_but_input_error(
    data: bytes, fields: Optional[list[str]]
) -> None:
    with contextlib.suppress(InputError):
        parse(data, fields=fields)


_cell = st.one_of(
    st.sampled_from(
        [
            "",
            "1",
            "-1",
            "5.batch",
            "Unknown",
            "1767225600",
            "2026-01-01T00:00:00",
            "cpu=1",
            "x=",
            "12:00",
            "\n",
        ]
    ),
    st.text(max_size=8),
)
_junk_line = st.one_of(
    st.binary(max_size=60),
    st.lists(_cell, max_size=25).map(lambda cells: D.join(cells).encode()),
    st.lists(_cell, max_size=25).map(lambda cells: "|".join(cells).encode()),
)


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(_junk_line, max_size=8),
    separator=st.sampled_from([b"\n", (D + "\n").encode(), b"|\n"]),
    layout=st.sampled_from([(D, True), ("|", True), ("|", False), ("\t", False)]),
)
def test_valid_header_with_junk_never_raises(
    lines: list[bytes], separator: bytes, layout: tuple[str, bool]
) -> None:
    delimiter, trailing = layout
    header = render([], delimiter=delimiter, trailing=trailing)
    result = parse(header + separator.join(lines))
    for record in result.records:
        assert record.submit_at.utcoffset() == timedelta(0)
        assert record.elapsed_s >= 0
    for rejected in result.rejected:
        assert rejected.line >= 2
        assert rejected.reason


_word = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", max_size=12
)
_job_name = st.text(max_size=30).filter(lambda name: D not in name)
_epoch = st.integers(min_value=1, max_value=4102444800)  # up to 2100


@st.composite
def _live_row(draw: st.DrawFn) -> dict[str, Any]:
    raw = draw(st.integers(min_value=1, max_value=2**31))
    shown = draw(
        st.sampled_from(
            [str(raw), f"{raw}_{draw(st.integers(0, 9999))}", f"{raw}+{draw(st.integers(0, 9))}"]
        )
    )
    start = draw(st.one_of(st.none(), _epoch))
    end = draw(st.one_of(st.none(), _epoch))
    gpus = draw(st.integers(min_value=0, max_value=16))
    mem = draw(st.integers(min_value=0, max_value=10**7))
    tres = Tres(
        cpu=draw(st.integers(min_value=0, max_value=100000)),
        mem_mb=Decimal(mem),
        node=draw(st.integers(min_value=0, max_value=5000)),
        gpu=gpus,
        billing=draw(st.integers(min_value=0, max_value=10**6)),
    )
    typed = draw(st.booleans())
    gres = ([f"gres/gpu:a100={gpus}"] if typed else []) + ([f"gres/gpu={gpus}"] if gpus else [])
    state = draw(
        st.sampled_from(
            [
                "COMPLETED",
                "RUNNING",
                "PENDING",
                "NODE_FAIL",
                "REQUEUED",
                "OUT_OF_MEMORY",
                "FUTURE_STATE",
            ]
        )
    )
    cancelled_by = draw(st.booleans())
    return {
        "cells": {
            "Cluster": draw(_word),
            "JobID": shown,
            "JobIDRaw": str(raw),
            "Account": draw(_word),
            "Partition": draw(_word),
            "User": draw(_word),
            "Group": draw(_word),
            "QOS": draw(_word),
            "Submit": str(draw(_epoch)),
            "Eligible": str(draw(_epoch)),
            "Start": str(start) if start else "Unknown",
            "End": str(end) if end else "Unknown",
            "ElapsedRaw": str(draw(st.integers(min_value=0, max_value=10 * 365 * 86400))),
            "State": f"{state} by 1000" if cancelled_by else state,
            "ExitCode": "0:0",
            "AllocTRES": ",".join(
                [
                    f"billing={tres.billing}",
                    f"cpu={tres.cpu}",
                    *gres,
                    f"mem={mem // 1024}G" if mem % 1024 == 0 else f"mem={mem}M",
                    f"node={tres.node}",
                ]
            ),
            "NNodes": str(tres.node),
            "NodeList": draw(_word),
            "Reservation": draw(_word),
            "JobName": draw(_job_name),
        },
        "tres": tres,
        "state": state,
    }


def _epoch_at(text: str) -> Optional[datetime]:
    return None if text == "Unknown" else datetime.fromtimestamp(int(text), UTC)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(_live_row(), min_size=1, max_size=5))
def test_live_format_round_trip(rows: list[dict[str, Any]]) -> None:
    data = render([r["cells"] for r in rows])
    result = parse(data)
    assert result.rejected == ()
    assert len(result.records) == len(rows)
    line = 2
    for record, generated in zip(result.records, rows):
        cells = generated["cells"]
        assert record.cluster == (cells["Cluster"] or "default-cluster")
        assert record.job_id == cells["JobID"]
        assert record.job_id_raw == cells["JobIDRaw"]
        assert record.submit_at == _epoch_at(cells["Submit"])
        assert record.start_at == _epoch_at(cells["Start"])
        assert record.end_at == _epoch_at(cells["End"])
        assert record.elapsed_s == int(cells["ElapsedRaw"])
        assert record.state == generated["state"]
        assert (record.account, record.partition, record.user) == (
            cells["Account"],
            cells["Partition"],
            cells["User"],
        )
        assert record.tres == generated["tres"]
        assert record.job_name == cells["JobName"]
        assert record.line == line
        assert record.extra["NodeList"] == cells["NodeList"]
        line += 1 + cells["JobName"].count("\n")
