"""What the state file keeps of a correction's record (corrections.record_json): the TRES part
is written from the table of billing metrics, and reads rows written before it, byte for byte
the same as they were written."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest

from slurm_tracker.corrections import record_from_json, record_json
from slurm_tracker.models import Tres
from tests.factories import record

#: As written before the table of billing metrics (cpu, mem_mb, node, gpu, billing were the
#: fields of Tres).
KEPT = (
    '{"account": "physics", "cluster": "box", "elapsed_s": 3600, "end_at": 1773147600, '
    '"extra": {"QOS": "normal"}, "job_id": "5", "job_id_raw": "5", "job_name": "", "line": 0, '
    '"partition": "compute", "start_at": 1773144000, "state": "COMPLETED", '
    '"submit_at": 1773143700, "tres": {"billing": 78, "cpu": 48, "gpu": 4, '
    '"mem_mb": "393216", "node": 1}, "user": "alice"}'
)


def test_a_record_is_kept_exactly_as_before() -> None:
    rec = record(job_id="5", cpu=48, gpu=4, mem_mb=393216, node=1, billing=78, QOS="normal")
    assert record_json(rec, ("qos",)) == KEPT
    odd = replace(rec, tres=Tres(mem_mb=Decimal("64000.5")), extra={})
    assert '"tres": {"billing": 0, "cpu": 0, "gpu": 0, "mem_mb": "64000.5", "node": 0}' in (
        record_json(odd)
    )


def test_a_kept_record_reads_back_whole() -> None:
    rec = record_from_json(KEPT)
    assert rec.tres == Tres(cpu=48, mem_mb=Decimal(393216), node=1, gpu=4, billing=78)
    assert isinstance(rec.tres.cpu, int) and isinstance(rec.tres.mem_mb, Decimal)
    assert record_json(rec, ("qos",)) == KEPT
    fraction = json.loads(KEPT)
    fraction["tres"]["mem_mb"] = "0.5"
    assert record_from_json(json.dumps(fraction)).tres.mem_mb == Decimal("0.5")


@pytest.mark.parametrize(
    ("tres", "expected"),
    [
        ({"cpu": 2}, Tres(cpu=2)),  # a key a row lacks is none held
        ({"cpu": 2, "tpu": 9}, Tres(cpu=2)),  # a key of a newer version is ignored
    ],
)
def test_rows_are_read_both_ways(tres: dict[str, object], expected: Tres) -> None:
    row = json.loads(KEPT)
    row["tres"] = tres
    assert record_from_json(json.dumps(row)).tres == expected


@pytest.mark.parametrize("tres", ['"cpu=2"', '{"cpu": "many"}', '{"mem_mb": "lots"}', "null"])
def test_a_damaged_tres_is_not_a_record(tres: str) -> None:
    with pytest.raises(ValueError, match="not a record kept with a correction"):
        record_from_json(
            KEPT.replace(
                '{"billing": 78, "cpu": 48, "gpu": 4, "mem_mb": "393216", "node": 1}', tres
            )
        )
