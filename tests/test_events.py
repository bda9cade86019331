from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.events import event_key, plan, quantity, request_body
from slurm_tracker.models import SkuCharge
from slurm_tracker.segments import split
from tests.factories import T0, record

CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")


@pytest.mark.parametrize(
    ("metric", "kwargs", "seconds", "expected"),
    [
        ("cpu", {"cpu": 4}, 3600, Decimal("4.000000")),
        ("cpu", {"cpu": 48}, 1, Decimal("0.013333")),
        ("gpu", {"gpu": 2}, 5400, Decimal("3.000000")),
        ("mem", {"mem_mb": 1536}, 3600, Decimal("1.500000")),  # 1.5 GB (1024 MiB each)
        ("node", {"node": 3}, 1200, Decimal("1.000000")),
        ("billing", {"billing": 78}, 60, Decimal("1.300000")),
        ("gpu", {"gpu": 0}, 3600, Decimal("0.000000")),
    ],
)
def test_quantity(metric: str, kwargs: dict[str, int], seconds: int, expected: Decimal) -> None:
    seg = split(record(elapsed_s=seconds, **kwargs), 0, seconds)[0]  # type: ignore[arg-type]
    assert quantity(seg, SkuCharge("X", metric)) == expected


def test_event_key_is_deterministic_and_names_run_span_and_sku() -> None:
    rec = record(job_id="4242", elapsed_s=600)
    seg = split(rec, 0, 600)[0]
    submit = int(rec.submit_at.timestamp())
    assert event_key(seg, "SKU1") == f"st1:box:4242:{submit}:0-600:SKU1"
    assert event_key(seg, "SKU1") == event_key(split(rec, 0, 600)[0], "SKU1")


def test_plan_metadata_and_body_match_the_contract_shape() -> None:
    rec = record(job_id="77", elapsed_s=1800, cpu=2, gpu=0, job_name="secret", QOS="normal")
    events = plan(split(rec, 0, 1800), "physics-2026", [CPU, SkuCharge("G", "gpu")], ["qos"])
    assert len(events) == 1  # no GPUs: no GPU event
    event = events[0]
    assert event.quantity == Decimal("1.000000")
    assert event.metadata["eventKey"] == event.event_key
    assert event.metadata["qos"] == "normal"
    assert "jobName" not in event.metadata  # private unless asked for
    body = request_body(event)
    assert set(body) == {"sku", "quantity", "startedAt", "endedAt", "metadata", "user"}
    assert body["startedAt"] == "2026-03-10T12:00:00Z"
    assert body["endedAt"] == "2026-03-10T12:30:00Z"
    assert body["quantity"] == 1.0
    assert event.final


def test_job_name_only_when_configured() -> None:
    rec = record(job_name="my|job")
    events = plan(split(rec, 0, 3600), "a", [CPU], ["job_name"])
    assert events[0].metadata["jobName"] == "my|job"


@settings(max_examples=150, deadline=None)
@given(
    cpu=st.integers(1, 512),
    cuts=st.lists(st.integers(1, 10 * 86400 - 1), max_size=10, unique=True),
)
def test_rounding_error_stays_within_a_millionth_per_event(cpu: int, cuts: list[int]) -> None:
    elapsed = 10 * 86400
    rec = record(cpu=cpu, elapsed_s=elapsed)
    instants = [datetime.fromtimestamp(T0.timestamp() + c, timezone.utc) for c in cuts]
    events = plan(split(rec, 0, elapsed, instants), "a", [CPU])
    exact = Decimal(cpu) * elapsed / 3600
    assert abs(sum(e.quantity for e in events) - exact) <= Decimal("0.000001") * len(events)
