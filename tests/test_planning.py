"""Planning (slurm_tracker/planning.py): records -> events, skipped runs, rejected records."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import planning, plans, rating
from slurm_tracker.config import config_from_text
from slurm_tracker.models import ParseResult, Rejected
from tests.factories import record

UTC = timezone.utc
CONFIG = config_from_text(
    """
cluster: box
reporting_interval: 15m
accounts: {map: {physics: phys}, ignore: [root]}
partitions:
  map:
    gpu: [{sku: GPU_HOUR, metric: gpu}]
    compute: CPU_HOUR
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
                                "effectiveTo": "2026-03-31T23:30:00Z",
                                "rate": 2.5,
                            },
                            {
                                "effectiveFrom": "2026-03-31T23:30:00Z",
                                "effectiveTo": None,
                                "rate": 2,
                            },
                        ],
                    },
                    {"code": "CPU_HOUR", "rules": []},
                ],
            }
        ]
    },
    "test catalog",
)


def parsed(*records: object) -> ParseResult:
    return ParseResult(records=tuple(records), rejected=())  # type: ignore[arg-type]


def test_rate_change_and_month_boundary_during_a_run_give_three_events() -> None:
    # 2 GPUs from 23:00 on 31 March for 2 h: rate changes at 23:30, the month at 00:00
    job = record(
        partition="gpu", gpu=2, elapsed_s=7200, start_at=datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
    )
    plan = planning.plan_usage(parsed(job), {}, CONFIG, CATALOG)
    spans = [(e.started_at.strftime("%m-%d %H:%M"), e.quantity, e.rated) for e in plan.events]
    assert [(s, q) for s, q, _ in spans] == [
        ("03-31 23:00", Decimal("1.000000")),
        ("03-31 23:30", Decimal("1.000000")),
        ("04-01 00:00", Decimal("2.000000")),
    ]
    rated = [r for _, _, r in spans]
    assert all(r is not None for r in rated)
    assert [(r.sku_rate, r.amount, r.usd) for r in rated if r] == [
        (Decimal("2.5"), Decimal("2.500000"), Decimal("0.100000")),
        (Decimal("2"), Decimal("2.000000"), Decimal("0.080000")),
        (Decimal("2"), Decimal("4.000000"), Decimal("0.160000")),
    ]
    (total,) = plans.totals(plan.events)
    assert (total.quantity, total.amount, total.usd) == (
        Decimal("4.000000"),
        Decimal("8.500000"),
        Decimal("0.340000"),
    )


def test_usage_before_the_first_rule_is_a_reported_problem_not_a_zero() -> None:
    job = record(
        partition="gpu", gpu=1, elapsed_s=3600, start_at=datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    )
    plan = planning.plan_usage(parsed(job), {}, CONFIG, CATALOG)
    assert [e.rated is None for e in plan.events] == [True, False]
    assert len(plan.rating_problems) == 1 and "GPU_HOUR" in plan.rating_problems[0]
    (total,) = plans.totals(plan.events)
    assert total.amount is None and total.quantity == Decimal("1.000000")


def test_one_record_per_run_the_most_advanced_wins() -> None:
    running = record(job_id="5", elapsed_s=1000, final=False)
    done = record(job_id="5", elapsed_s=4000, final=True)
    plan = planning.plan_usage(parsed(running, done), {}, CONFIG)
    assert [e.to_s for e in plan.events] == [4000]
    assert len(plan.skipped) == 1 and "duplicate record" in plan.skipped[0].reason


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["physics", "root", "other"]),
            st.sampled_from(["compute", "gpu", "debug"]),
            st.integers(0, 50000),
            st.booleans(),
            st.integers(0, 3),
            st.integers(0, 60000),
        ),
        max_size=15,
    )
)
def test_every_record_ends_as_events_or_one_skip(
    rows: list[tuple[str, str, int, bool, int, int]],
) -> None:
    records = [
        record(job_id=str(i), account=a, partition=p, elapsed_s=e, final=f, gpu=g)
        for i, (a, p, e, f, g, _) in enumerate(rows)
    ]
    reported = {r.run: rows[i][5] for i, r in enumerate(records)}
    plan = planning.plan_usage(
        ParseResult(tuple(records), (Rejected(1, "bad"),)), reported, CONFIG, CATALOG
    )
    billed = {e.run for e in plan.events}
    skipped = [s.run for s in plan.skipped]
    assert len(skipped) == len(set(skipped))
    assert billed.isdisjoint(skipped)
    assert billed | set(skipped) == {r.run for r in records}
    assert len(plan.rejected) == 1
