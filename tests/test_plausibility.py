"""Plausibility limits and the plan stage's isolation of bad records (issue 8, items 2 and 3).

Each implausible record is rejected with its identity and reason, never billed, and never
stops the other records from being planned."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from slurm_tracker import events, pipeline, planning
from slurm_tracker.config import Limits, config_from_text
from slurm_tracker.models import JobRecord, ParseResult, Tres
from slurm_tracker.plausibility import implausible
from tests.factories import T0, record

UTC = timezone.utc
NOW = T0 + timedelta(days=2)
LIMITS = Limits()
CONFIG = config_from_text(
    """
cluster: box
reporting_interval: 15m
accounts: {map: {physics: phys, chemistry: chem}}
partitions: {map: {compute: CPU_HOUR, gpu: [{sku: GPU_HOUR, metric: gpu}]}}
""",
    "test",
)


def test_a_normal_record_is_plausible() -> None:
    assert implausible(record(), NOW, LIMITS) is None
    assert implausible(record(final=False, start_at=NOW - timedelta(hours=2)), NOW, LIMITS) is None


def _with(**changes: object) -> JobRecord:
    return replace(record(), **changes)  # type: ignore[arg-type]


FAR = datetime(9999, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (_with(end_at=T0 - timedelta(hours=1)), "End .* is before Start"),
        (_with(submit_at=T0 + timedelta(hours=1)), "Start .* is before Submit"),
        (_with(start_at=NOW + timedelta(hours=1)), "Start .* is in the future"),
        (_with(end_at=FAR), "End 9999-01-01.* is in the future"),
        (_with(start_at=FAR, end_at=None, submit_at=FAR), "Submit 9999.* in the future"),
        (
            _with(
                submit_at=datetime(1970, 1, 1, tzinfo=UTC),
                start_at=datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC),
            ),
            "Submit 1970-01-01.* is before 2000",
        ),
        (_with(elapsed_s=3600 * 24), "ElapsedRaw 86400 s is more than End - Start"),
        (
            replace(record(final=False, start_at=NOW - timedelta(hours=1)), elapsed_s=86400),
            "ElapsedRaw 86400 s is more than now - Start",
        ),
        (_with(tres=Tres(cpu=4294967293, node=1)), "4294967293 allocated CPUs .* limits.max_cpus"),
        (_with(tres=Tres(cpu=1, gpu=10**6)), "allocated GPUs .* limits.max_gpus"),
        (_with(tres=Tres(cpu=1, node=10**7)), "allocated nodes .* limits.max_nodes"),
        (_with(tres=Tres(cpu=1, mem_mb=Decimal("1e30"))), "MiB of memory .* limits.max_memory"),
    ],
)
def test_implausible_records(bad: JobRecord, why: str) -> None:
    reason = implausible(bad, NOW, LIMITS)
    assert reason is not None
    assert re.search(why, reason), reason


def test_tolerances_and_configured_limits() -> None:
    skewed = _with(end_at=NOW + timedelta(seconds=60), elapsed_s=3600)
    assert implausible(skewed, NOW, LIMITS) is None  # within clock_skew
    assert implausible(skewed, NOW, replace(LIMITS, clock_skew_s=10)) is not None
    big = _with(tres=Tres(cpu=64, node=1))
    assert implausible(big, NOW, replace(LIMITS, max_cpus=64)) is None
    assert "limits.max_cpus (63)" in str(implausible(big, NOW, replace(LIMITS, max_cpus=63)))


def test_records_that_bill_nothing_are_not_judged() -> None:
    # A run cancelled before it started, or with no elapsed time, produces no usage.
    assert implausible(_with(start_at=None, end_at=FAR), NOW, LIMITS) is None
    assert implausible(_with(elapsed_s=0, end_at=T0 - timedelta(days=1)), NOW, LIMITS) is None


# --- the plan stage -------------------------------------------------------------------------


def plan(*records: JobRecord, **kwargs: object) -> pipeline.Plan:
    parsed = ParseResult(records=tuple(records), rejected=())
    return pipeline.plan_usage(parsed, {}, CONFIG, None, now_at=NOW, **kwargs)  # type: ignore[arg-type]


POISON = {
    "year 9999": _with(job_id="2", start_at=FAR, end_at=FAR, submit_at=FAR),
    "End before Start": _with(job_id="3", end_at=T0 - timedelta(days=1)),
    "huge cpu": _with(job_id="4", tres=Tres(cpu=4294967293, node=1)),
    "huge memory": _with(job_id="5", tres=Tres(cpu=1, mem_mb=Decimal("9" * 5000))),
    "ten years": _with(job_id="6", elapsed_s=10 * 366 * 86400),
}


@pytest.mark.parametrize("name", sorted(POISON))
def test_a_poison_record_is_rejected_and_the_rest_is_billed(name: str) -> None:
    good = record(job_id="1")
    result = plan(POISON[name], good)
    assert [e.metadata["jobId"] for e in result.events] == ["1"]
    (rejected,) = result.rejected
    assert rejected.job_id == POISON[name].job_id
    assert rejected.run == POISON[name].run
    assert rejected.key == POISON[name].run.text
    assert rejected.reason.startswith(f"job {POISON[name].job_id}: ")
    assert result.checked_runs == {good.run.text}


def test_an_unexpected_failure_in_one_record_is_a_rejection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = events.plan

    def explode(segments, *args, **kwargs):  # type: ignore[no-untyped-def]
        if segments[0].record.job_id == "7":
            raise OverflowError("date value out of range")
        return real(segments, *args, **kwargs)

    monkeypatch.setattr(planning, "plan", explode)
    result = plan(record(job_id="7"), record(job_id="8"))
    assert [e.metadata["jobId"] for e in result.events] == ["8"]
    (rejected,) = result.rejected
    assert "cannot be planned (OverflowError: date value out of range)" in rejected.reason


def test_events_above_the_ceiling_are_held() -> None:
    config = replace(CONFIG, limits=replace(CONFIG.limits, hold_above=Decimal(100)))
    small = record(job_id="1", cpu=4)  # 4 core-hours
    big = record(job_id="2", cpu=128)  # 128 core-hours
    parsed = ParseResult(records=(small, big), rejected=())
    result = pipeline.plan_usage(parsed, {}, config, None, now_at=NOW)
    assert [e.metadata["jobId"] for e in result.events] == ["1", "2"]
    assert result.held == {result.events[1].event_key}
    unlimited = replace(CONFIG, limits=replace(CONFIG.limits, hold_above=Decimal(0)))
    assert not pipeline.plan_usage(parsed, {}, unlimited, None, now_at=NOW).held


def test_usage_before_the_billing_floor_is_not_billed() -> None:
    floor = T0 + timedelta(minutes=30)
    before = record(job_id="1", elapsed_s=600)  # ends at T0 + 10 min
    across = record(job_id="2", elapsed_s=3600)  # T0 .. T0 + 1 h: half after the floor
    result = plan(before, across, floor_at=floor)
    (event,) = result.events
    assert event.metadata["jobId"] == "2"
    assert event.metadata["elapsedFrom"] == 1800 and event.quantity == Decimal(2)
    (skipped,) = [s for s in result.skipped if s.job_id == "1"]
    assert "billing floor" in skipped.reason


def test_other_clusters_are_rejected_when_clusters_are_listed() -> None:
    config = replace(CONFIG, sacct=replace(CONFIG.sacct, clusters=("box", "other")))
    ours, listed, stranger = (
        record(job_id=str(n), cluster=c) for n, c in ((1, "box"), (2, "other"), (3, "evil"))
    )
    parsed = ParseResult(records=(ours, listed, stranger), rejected=())
    result = pipeline.plan_usage(parsed, {}, config, None, now_at=NOW)
    assert sorted(e.metadata["jobId"] for e in result.events) == ["1", "2"]
    assert [r.job_id for r in result.rejected] == ["3"]
