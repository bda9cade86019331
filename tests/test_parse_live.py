"""The live query's output: no byte sequence in a job name can create, change, hide or merge
a record (issue 8, item 1).

The attack of the issue: a job named ``x|#|`` + newline + a forged record. With the old
fixed delimiter the forged record was billed. Here every job name an attacker could choose is
tried against the live reader (a fresh delimiter, exact header, exact field counts)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.errors import InputError
from slurm_tracker.models import ParseResult
from slurm_tracker.parse import parse_live, parse_sacct
from slurm_tracker.sacct import CAPTURE_DELIMITER, live_fields, new_delimiter

FIELDS = live_fields(with_job_name=True)
GOOD = {
    "Cluster": "box",
    "JobID": "41",
    "JobIDRaw": "41",
    "Account": "physics",
    "Partition": "compute",
    "User": "alice",
    "Group": "alice",
    "QOS": "normal",
    "Submit": "1767225600",
    "Eligible": "1767225600",
    "Start": "1767225660",
    "End": "1767229260",
    "ElapsedRaw": "3600",
    "State": "COMPLETED",
    "ExitCode": "0:0",
    "AllocTRES": "billing=4,cpu=4,mem=4G,node=1",
    "NNodes": "1",
    "NodeList": "vm",
    "Reservation": "",
    "JobName": "ok",
}
FORGED = {**GOOD, "JobID": "999999", "JobIDRaw": "999999", "Account": "chemistry"}
FORGED["AllocTRES"] = "cpu=4294967293,node=1"


def output(names: Sequence[str], delimiter: str, fields: Sequence[str] = FIELDS) -> bytes:
    """What sacct prints for one job per name (``-p``: the delimiter after every field)."""
    lines = [delimiter.join(fields) + delimiter]
    for number, name in enumerate(names, start=1):
        row = {**GOOD, "JobID": str(number), "JobIDRaw": str(number), "JobName": name}
        lines.append(delimiter.join(row[f] for f in fields) + delimiter)
    return ("\n".join(lines) + "\n").encode()


def forged_record(delimiter: str) -> str:
    return delimiter.join(FORGED[f] for f in FIELDS) + delimiter


def attacks() -> list[str]:
    """Job names that forged records under the old reader, in every plausible delimiter."""
    names = []
    for guess in (CAPTURE_DELIMITER, "|", "\t", "|~", "~|", ",", ";", " "):
        forged = forged_record(guess)
        header = guess.join(FIELDS) + guess
        names += [
            f"x{guess}\n{forged}",
            f"x{guess}\n{header}\n{forged}",
            f"{guess}\n{forged}\n",
            f"x{guess}{guess}{guess}",
            guess * 50,
        ]
    names += ["a\nb", "\n", "tab\there", "x" * 100_000, "\x1b[2J\x1b[31mred", "\x00nul"]
    return names


def parse(data: bytes, delimiter: str, fields: Sequence[str] = FIELDS) -> ParseResult:
    return parse_live(data, delimiter=delimiter, fields=fields, cluster="box", source="sacct")


def test_every_attack_name_gives_exactly_its_own_record() -> None:
    names = attacks()
    delimiter = new_delimiter()
    result = parse(output(names, delimiter), delimiter)
    assert not result.rejected
    assert [r.job_id for r in result.records] == [str(n) for n in range(1, len(names) + 1)]
    assert [r.job_name for r in result.records] == names
    assert {r.account for r in result.records} == {"physics"}
    assert {r.tres.cpu for r in result.records} == {4}
    assert [r.line for r in result.records][:2] == [2, 2 + 1 + names[0].count("\n")]


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.text(max_size=300), min_size=1, max_size=5))
def test_any_job_name_gives_exactly_its_own_record(names: list[str]) -> None:
    delimiter = new_delimiter()
    result = parse(output(names, delimiter), delimiter)
    assert not result.rejected
    assert [r.job_name for r in result.records] == names
    assert [r.job_id for r in result.records] == [str(n) for n in range(1, len(names) + 1)]


@settings(max_examples=200, deadline=None)
@given(raw=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_any_bytes_in_a_job_name_bill_the_job(raw: list[bytes]) -> None:
    # Bad UTF-8 in a name must not get the record rejected (and so not billed).
    delimiter = new_delimiter()
    marker = [f"@@{n}@@" for n in range(len(raw))]
    data = output(marker, delimiter)
    for mark, value in zip(marker, raw):
        if delimiter.encode() in value:
            continue
        data = data.replace(mark.encode(), value)
    result = parse(data, delimiter)
    assert len(result.records) == len(raw)
    assert not result.rejected


def test_without_job_names_the_output_has_no_user_text() -> None:
    fields = live_fields(with_job_name=False)
    delimiter = new_delimiter()
    result = parse(output(["ignored"], delimiter, fields), delimiter, fields)
    assert [r.job_id for r in result.records] == ["1"]
    assert result.records[0].job_name == ""


def test_a_record_with_the_wrong_field_count_is_rejected_not_repaired() -> None:
    # Cannot come from a job name (the delimiter is unknown when it is written); it means the
    # output was damaged: the record is quarantined, never guessed at.
    delimiter = new_delimiter()
    data = output(["a", "b"], delimiter).replace(b"physics", b"phys" + delimiter.encode(), 1)
    result = parse(data, delimiter)
    assert [r.job_id for r in result.records] == ["2"]
    (rejected,) = result.rejected
    assert "has 21 fields instead of 20" in rejected.reason
    assert rejected.run is None  # which field is which cannot be known: no identity guessed
    assert rejected.key.startswith("record:")


def test_a_truncated_tail_is_rejected() -> None:
    delimiter = new_delimiter()
    data = output(["a", "b"], delimiter)[: -len(delimiter) - 5]
    result = parse(data, delimiter)
    assert [r.job_id for r in result.records] == ["1"]
    (rejected,) = result.rejected
    assert "truncated" in rejected.reason


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"something else entirely\n",
        b"Cluster|#|JobID|#|\n",
    ],
)
def test_an_output_without_the_header_asked_for_is_refused(header: bytes) -> None:
    delimiter = new_delimiter()
    body = output(["a"], delimiter).split(b"\n", 1)[1]
    with pytest.raises(InputError, match="does not start with the header"):
        parse(header + body, delimiter)


def test_only_the_header_is_an_empty_result() -> None:
    delimiter = new_delimiter()
    result = parse(output([], delimiter), delimiter)
    assert result.records == () and result.rejected == ()


def test_saved_files_with_any_delimiter_are_read_by_their_header() -> None:
    # A capture made with the live command's random delimiter can be replayed with
    # --sacct-file: the delimiter is found between the header's first two names.
    delimiter = new_delimiter()
    result = parse_sacct(output(["a", "b\nc"], delimiter), cluster="box")
    assert [r.job_name for r in result.records] == ["a", "b\nc"]


@pytest.mark.parametrize(
    "job_id, raw_id, outcome",
    [
        ("253402300799", "0.0", "rejected"),  # found by the fuzz test: was ignored as a step
        ("7.batch", "7", "rejected"),
        ("7_3", "9", "record"),  # an array task: JobIDRaw is its own job id
        ("7_3.batch", "9.batch", "step"),
        ("7+1.0", "8.0", "step"),
    ],
)
def test_a_record_whose_two_ids_disagree_on_being_a_step_is_rejected(
    job_id: str, raw_id: str, outcome: str
) -> None:
    # Mutant: a step when either id says so (the record's usage silently left out as a step)
    fields = ("JobID", "JobIDRaw", "Submit", "Start", "End", "ElapsedRaw", "AllocTRES")
    row = (job_id, raw_id, "1767225600", "1767225600", "1767229200", "3600", "cpu=2,node=1")
    data = ("|".join(fields) + "\n" + "|".join(row) + "\n").encode()
    parsed = parse_sacct(data, cluster="box")
    got = {
        "record": (len(parsed.records), len(parsed.rejected), parsed.steps_ignored) == (1, 0, 0),
        "rejected": (len(parsed.records), len(parsed.rejected), parsed.steps_ignored) == (0, 1, 0),
        "step": (len(parsed.records), len(parsed.rejected), parsed.steps_ignored) == (0, 0, 1),
    }
    assert got[outcome], parsed
    if outcome == "rejected":
        assert "disagree on whether this is a job or one of its steps" in parsed.rejected[0].reason
