from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import pipeline, rating
from slurm_tracker.cli import main
from slurm_tracker.config import SacctConfig, config_from_text
from slurm_tracker.models import ParseResult, Rejected
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, DEFAULT_CATALOG, Emulator
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
    plan = pipeline.plan_usage(parsed(job), {}, CONFIG, CATALOG)
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
    (total,) = pipeline.totals(plan.events)
    assert (total.quantity, total.amount, total.usd) == (
        Decimal("4.000000"),
        Decimal("8.500000"),
        Decimal("0.340000"),
    )


def test_usage_before_the_first_rule_is_a_reported_problem_not_a_zero() -> None:
    job = record(
        partition="gpu", gpu=1, elapsed_s=3600, start_at=datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    )
    plan = pipeline.plan_usage(parsed(job), {}, CONFIG, CATALOG)
    assert [e.rated is None for e in plan.events] == [True, False]
    assert len(plan.rating_problems) == 1 and "GPU_HOUR" in plan.rating_problems[0]
    (total,) = pipeline.totals(plan.events)
    assert total.amount is None and total.quantity == Decimal("1.000000")


def test_one_record_per_run_the_most_advanced_wins() -> None:
    running = record(job_id="5", elapsed_s=1000, final=False)
    done = record(job_id="5", elapsed_s=4000, final=True)
    plan = pipeline.plan_usage(parsed(running, done), {}, CONFIG)
    assert [e.to_s for e in plan.events] == [4000]
    assert len(plan.skipped) == 1 and "duplicate record" in plan.skipped[0].reason


@pytest.mark.parametrize(
    ("high_water", "first", "expected_start"),
    [
        (None, None, datetime(2026, 5, 1, 11, 58, tzinfo=UTC) - timedelta(days=1)),
        (None, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
        (datetime(2026, 5, 1, 11, 0, tzinfo=UTC), None, datetime(2026, 5, 1, 10, 0, tzinfo=UTC)),
    ],
)
def test_sync_window(
    high_water: datetime | None, first: datetime | None, expected_start: datetime
) -> None:
    cfg = SacctConfig(lag_s=120, overlap_s=3600, first_sync_start=first)
    window = pipeline.sync_window(datetime(2026, 5, 1, 12, 0, tzinfo=UTC), high_water, cfg)
    assert window == pipeline.Window(expected_start, datetime(2026, 5, 1, 11, 58, tzinfo=UTC))


def test_chunks_cover_the_range_exactly() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    windows = pipeline.chunks(start, start + timedelta(hours=60), 86400)
    assert [(w.end_at - w.start_at).total_seconds() / 3600 for w in windows] == [24, 24, 12]
    assert all(a.end_at == b.start_at for a, b in zip(windows, windows[1:]))


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
    plan = pipeline.plan_usage(
        ParseResult(tuple(records), (Rejected(1, "bad"),)), reported, CONFIG, CATALOG
    )
    billed = {e.run for e in plan.events}
    skipped = [s.run for s in plan.skipped]
    assert len(skipped) == len(set(skipped))
    assert billed.isdisjoint(skipped)
    assert billed | set(skipped) == {r.run for r in records}
    assert len(plan.rejected) == 1


def test_catalog_pull_writes_a_catalog_the_dry_run_can_use(tmp_path: Path) -> None:
    # the embedded catalog keys SKUs by code: one code in two units is refused (tested in
    # test_rating), so the emulator's second GPU_HOUR is left out here
    catalog = copy.deepcopy(dict(DEFAULT_CATALOG))
    del catalog["skus"]["gpu-hours"]["GPU_HOUR"]
    with Emulator(catalog) as emulator:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"cluster: box\napi: {{organization: test-org, url: '{emulator.base_url}'}}\n"
            "accounts: {map: {physics: physics}}\npartitions: {map: {compute: CPU_HOUR}}\n"
            "catalog_file: catalog.yaml\n"
        )
        result = cli_runner().invoke(
            main, ["catalog", "pull", "--config", str(config)], env={"PW_API_KEY": DEFAULT_API_KEY}
        )
    assert result.exit_code == 0, shown(result)
    pulled = rating.load_catalog_file(tmp_path / "catalog.yaml")
    assert {"CPU_HOUR", "GPU_HOUR", "MEM_GB_HOUR", "OLD_SKU"} <= set(pulled.skus)
    assert pulled.skus["OLD_SKU"].archived
    cpu = rating.rate(
        pulled,
        "CPU_HOUR",
        Decimal(2),
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 2, 1, 1, tzinfo=UTC),
    )
    assert (cpu.amount, cpu.usd) == (Decimal("3.000000"), Decimal("0.150000"))
    show = cli_runner().invoke(
        main, ["catalog", "show", "--config", str(config), "--at", "2025-06-01T00:00:00Z"]
    )
    assert show.exit_code == 0 and "CPU_HOUR" in shown(show)
