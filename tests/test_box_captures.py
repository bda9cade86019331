"""The project's own captures from its Slurm 22.05 box (tests/data/README.md): the parsable
and the JSON capture of the same window agree run by run, and the dry run bills each part of
the workload (tests/data/sacct-box-22.05.jobs.tsv) exactly as hand-computed."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest

from slurm_tracker import pipeline
from slurm_tracker.config import load_config
from slurm_tracker.models import JobRecord
from slurm_tracker.parse import parse_sacct

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def records(name: str) -> dict[tuple[str, str, int], JobRecord]:
    result = parse_sacct((DATA / name).read_bytes(), cluster="box", source=name)
    assert result.rejected == () and result.steps_ignored == 0
    return {(r.cluster, r.job_id_raw, int(r.submit_at.timestamp())): r for r in result.records}


def comparable(record: JobRecord) -> JobRecord:
    # JSON and parsable output differ in extra fields (exit codes, "CANCELLED by 0")
    return dataclasses.replace(record, extra={}, line=0)


def test_parsable_and_json_captures_agree_run_by_run() -> None:
    text, json_ = records("sacct-box-22.05.txt"), records("sacct-box-22.05.json")
    assert len(text) == 23
    assert text.keys() == json_.keys()
    for key, record in text.items():
        assert comparable(record) == comparable(json_[key]), key


def test_capture_facts() -> None:
    runs = records("sacct-box-22.05.txt")
    by_id: dict[str, list[JobRecord]] = {}
    for record in runs.values():
        by_id.setdefault(record.job_id, []).append(record)
    requeued = sorted(by_id["125"], key=lambda r: r.submit_at)
    assert [r.state for r in requeued] == ["REQUEUED", "COMPLETED"]
    assert requeued[0].submit_at < requeued[1].submit_at  # a requeue is a new run
    assert {r.job_id: r.job_id_raw for r in runs.values() if r.job_id.startswith("121_")} == {
        "121_0": "127",
        "121_1": "128",
        "121_2": "129",
        "121_3": "121",
    }
    assert by_id["122"][0].job_name == "odd|name\nsecond line"
    suspended = by_id["126"][0]
    assert suspended.end_at and suspended.start_at
    assert suspended.elapsed_s < (suspended.end_at - suspended.start_at).total_seconds()
    assert by_id["115"][0].tres.gpu == 2 and by_id["116"][0].tres.gpu == 1
    assert [r.final for r in by_id["130"] + by_id["133"]] == [False, False]
    assert by_id["134"][0].start_at is None
    assert "124" not in by_id  # cancelled while pending with Eligible in the future


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        # core- and GPU-seconds from the table in tests/data/sacct-box-22.05.jobs.tsv
        (
            900,
            {
                ("physics-2026", "SLURM_CPU_HOUR"): 66,
                ("physics-2026", "SLURM_GPU_HOUR"): 12,
                ("chemistry-2026", "SLURM_CPU_HOUR"): 90,
                ("chemistry-2026", "SLURM_GPU_HOUR"): 5,
            },
        ),
        # running jobs billed as they go: 130 (2 CPUs x 57 s), 133 (2 s), 131 (1 CPU+1 GPU x 57 s)
        (
            0,
            {
                ("physics-2026", "SLURM_CPU_HOUR"): 66 + 114 + 2,
                ("physics-2026", "SLURM_GPU_HOUR"): 12,
                ("chemistry-2026", "SLURM_CPU_HOUR"): 90 + 57,
                ("chemistry-2026", "SLURM_GPU_HOUR"): 5 + 57,
            },
        ),
    ],
)
def test_dry_run_bills_the_capture_as_hand_computed(
    interval: int, expected: dict[tuple[str, str], int]
) -> None:
    example = load_config(REPO / "config.example.yaml")
    config = dataclasses.replace(
        example,
        reporting_interval_s=interval,
        sacct=dataclasses.replace(example.sacct, lag_s=0),
    )
    parsed = parse_sacct((DATA / "sacct-box-22.05.txt").read_bytes(), cluster="box")
    plan = pipeline.plan_usage(parsed, {}, config, pipeline.load_catalog(config))
    totals = {(t.allocation, t.sku): t.quantity for t in pipeline.totals(plan.events)}
    assert set(totals) == set(expected)
    tolerance = Decimal("0.000001") * len(plan.events)  # per-event rounding
    for key, seconds in expected.items():
        assert abs(totals[key] - Decimal(seconds) / 3600) <= tolerance, key
    skipped = {s.job_id for s in plan.skipped}
    assert {"114", "122", "132", "134"} <= skipped  # unmapped-lab, pending
    assert not any(e.metadata["account"] == "unmapped-lab" for e in plan.events)
    requeued = [e for e in plan.events if e.metadata["jobId"] == "125"]
    assert len({e.run for e in requeued}) == 2  # both runs billed, once each
