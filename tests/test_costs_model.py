"""The cost and utilisation model, on hand-computed cases (slurm_tracker.costs.model)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.config import config_from_text
from slurm_tracker.costs.groups import build_report, group_function
from slurm_tracker.costs.intervals import Grid
from slurm_tracker.costs.model import OTHER, Report, build
from slurm_tracker.costs.pricing import prices_for
from slurm_tracker.costs.steps import RunUsage, Usage
from slurm_tracker.rating import catalog_from_data
from tests.factories import record

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)  # on a 15-minute boundary
D = Decimal

BASE = """\
cluster: box
accounts: {map: {physics: phys-alloc, chemistry: chem-alloc}}
partitions:
  map:
    compute: CPU_HOUR
    gpu: [{sku: GPU_HOUR, metric: gpu}, {sku: CPU_HOUR, metric: cpu}]
"""
PRICES = """\
pricing:
  currency: EUR
  partitions:
    compute: {cpu_hour: 0.5, mem_gb_hour: 0.25}
    "gpu*": {cpu_hour: 0.5, gpu_hour: 2}
"""


def config(extra: str = PRICES) -> Any:
    return config_from_text(BASE + extra, "test.yaml", base_dir=Path("/tmp"))


def usage(
    *,
    start_at: Optional[datetime] = T0,
    elapsed_s: int = 3600,
    cpu: int = 4,
    mem_mb: int = 0,
    gpu: int = 0,
    cpu_used_s: Optional[str] = None,
    mem_used_mb: Optional[str] = None,
    gpu_used_s: Optional[str] = None,
    mem_requested_mb: Optional[int] = None,
    nodes: tuple[str, ...] = ("n1",),
    **fields: Any,
) -> RunUsage:
    rec = record(start_at=start_at, elapsed_s=elapsed_s, cpu=cpu, mem_mb=mem_mb, gpu=gpu, **fields)
    return RunUsage(
        record=rec,
        steps=1,
        cpu_used_s=D(cpu_used_s) if cpu_used_s is not None else None,
        mem_requested_mb=D(mem_requested_mb if mem_requested_mb is not None else mem_mb),
        mem_used_mb=D(mem_used_mb) if mem_used_mb is not None else None,
        gpu_used_s=D(gpu_used_s) if gpu_used_s is not None else None,
        nodes=nodes,
    )


def report(
    runs: list[RunUsage],
    *,
    extra: str = PRICES,
    hours: int = 2,
    by: str = "account",
    catalog: Any = None,
) -> Report:
    cfg = config(extra)
    return build_report(
        cfg,
        catalog,
        Usage(tuple(runs)),
        by=by,
        start_at=T0,
        end_at=T0 + timedelta(hours=hours),
    )


def bars_total(rep: Report) -> Decimal:
    return sum((sum(v.values(), D(0)) for v in rep.series), D(0))


# --- utilisation ---------------------------------------------------------------------------


def test_memory_allocated_is_the_larger_of_requested_and_used() -> None:
    # asked 2 GiB, used 3 GiB for one hour: 3 GB-hours allocated, 100% used
    over = report([usage(mem_mb=2048, mem_used_mb="3072", account="physics")]).rows[0]
    assert over.mem_gbs / 3600 == D(3)
    assert over.mem_util == D(1)
    # asked 4 GiB, used 1 GiB: 4 GB-hours allocated, 25% used
    under = report([usage(mem_mb=4096, mem_used_mb="1024")]).rows[0]
    assert under.mem_gbs / 3600 == D(4)
    assert under.mem_util == D("0.25")
    # its cost follows the allocated memory: 4 GB x 1 h x 0.25 + 4 CPUs x 1 h x 0.5
    assert under.allocated["mem"] == D(1)
    assert under.allocated["cpu"] == D(2)


def test_cpu_utilisation_comes_from_total_cpu() -> None:
    # 4 CPUs for 1 h = 4 core-hours; TotalCPU 3600 s = 1 core-hour used: 25%
    row = report([usage(cpu=4, cpu_used_s="3600")]).rows[0]
    assert row.cpu_s / 3600 == D(4)
    assert row.cpu_util == D("0.25")


def test_gpu_allocated_is_requested_and_unknown_utilisation_is_not_zero() -> None:
    rep = report([usage(cpu=1, gpu=2, partition="gpu", elapsed_s=1800)])
    row = rep.rows[0]
    assert row.gpu_s / 3600 == D(1)  # 2 GPUs x 0.5 h
    assert row.gpu_util is None  # not recorded: unknown, never 0
    assert row.allocated["gpu"] == D(2)  # 1 GPU-hour x 2
    known = report([usage(gpu=2, partition="gpu", elapsed_s=1800, gpu_used_s="900")]).rows[0]
    assert known.gpu_util == D("0.25")


def test_unknown_usage_is_left_out_of_utilisation_not_counted_as_zero() -> None:
    runs = [usage(cpu=2, cpu_used_s="3600"), usage(job_id="2", cpu=2)]  # second: no TotalCPU
    row = report(runs).rows[0]
    assert row.cpu_s / 3600 == D(4)
    assert row.cpu_util == D("0.5")  # over the known run only


def test_no_usage_at_all_is_unknown() -> None:
    row = report([usage()]).rows[0]
    assert (row.cpu_util, row.mem_util, row.gpu_util) == (None, None, None)


# --- the time grid ---------------------------------------------------------------------------


def test_a_run_crossing_interval_boundaries_is_split_exactly_by_seconds() -> None:
    # 12:10:00 .. 12:40:00 with 1 CPU at 3.6/h (0.001 per CPU-second): 300 s + 900 s + 600 s
    start = T0 + timedelta(minutes=10)
    rep = report(
        [usage(start_at=start, elapsed_s=1800, cpu=1)],
        extra="pricing: {partitions: {compute: {cpu_hour: 3.6}}}\n",
    )
    costs = [sum(v.values(), D(0)) for v in rep.series[:4]]
    assert costs == [D("0.3"), D("0.9"), D("0.6"), D(0)]
    assert rep.rows[0].cpu_s == 1800


def test_only_the_part_inside_the_period_counts() -> None:
    # starts 30 minutes before the period: half of its 1 h counts, and half its TotalCPU
    rep = report([usage(start_at=T0 - timedelta(minutes=30), cpu=2, cpu_used_s="1800")])
    row = rep.rows[0]
    assert row.cpu_s == 2 * 1800
    assert row.cpu_used_s == 900
    assert row.cpu_util == D("0.25")


def test_totals_equal_the_sum_of_the_bars() -> None:
    runs = [
        usage(start_at=T0 + timedelta(seconds=7 * i), elapsed_s=600 + 97 * i, job_id=str(i),
              cpu=1 + i % 3, mem_mb=1000 + i, account=("physics", "chemistry", "bio")[i % 3])
        for i in range(30)
    ]  # fmt: skip
    rep = report(runs)
    assert bars_total(rep) == rep.total.total_cost
    per_group = {g: sum((v.get(g, D(0)) for v in rep.series), D(0)) for g in ("bio", "physics")}
    assert per_group["bio"] == next(r for r in rep.rows if r.group == "bio").total_cost
    assert per_group["physics"] == next(r for r in rep.rows if r.group == "physics").total_cost


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-3600, 3 * 3600), st.integers(0, 4 * 3600), st.integers(1, 64)),
        max_size=8,
    )
)
def test_bars_add_up_to_the_totals_and_core_hours_are_exact(
    spans: list[tuple[int, int, int]],
) -> None:
    runs = [
        usage(start_at=T0 + timedelta(seconds=s), elapsed_s=e, cpu=c, job_id=str(i))
        for i, (s, e, c) in enumerate(spans)
    ]
    extra = PRICES + "  nodes: [{names: n1, node_hour: 40}]\n"
    rep = report(runs, extra=extra)
    assert bars_total(rep) == rep.total.total_cost
    period = (T0.timestamp(), T0.timestamp() + 7200)
    expected = sum(
        c * max(0, min(T0.timestamp() + s + e, period[1]) - max(T0.timestamp() + s, period[0]))
        for s, e, c in spans
    )
    assert rep.total.cpu_s == expected


# --- prices ----------------------------------------------------------------------------------


CATALOG = {
    "units": [
        {
            "name": "core-hours",
            "ratedInUsd": True,
            "rules": [{"effectiveFrom": "2026-01-01T00:00:00Z", "effectiveTo": None, "rate": 1}],
            "skus": [
                {
                    "code": "CPU_HOUR",
                    "rules": [
                        {
                            "effectiveFrom": "2026-01-01T00:00:00Z",
                            "effectiveTo": "2026-03-10T12:30:00Z",
                            "rate": "0.04",
                        },
                        {
                            "effectiveFrom": "2026-03-10T12:30:00Z",
                            "effectiveTo": None,
                            "rate": "0.06",
                        },
                    ],
                },
                {"code": "GPU_HOUR", "rules": []},
            ],
        }
    ]
}


def test_cost_through_a_rate_change_uses_each_rate_for_its_seconds() -> None:
    # 2 CPUs 12:20 .. 12:50; CPU_HOUR 0.04 before 12:30, 0.06 after:
    # 2 x (10/60 h x 0.04 + 20/60 h x 0.06) = 0.013333... + 0.04
    catalog = catalog_from_data(CATALOG, "catalog")
    rep = report(
        [usage(start_at=T0 + timedelta(minutes=20), elapsed_s=1800, cpu=2)],
        extra="",
        catalog=catalog,
    )
    assert rep.currency == "USD"
    row = rep.rows[0]
    expected = D(2) * 600 * D("0.04") / 3600 + D(2) * 1200 * D("0.06") / 3600
    assert abs(row.total_cost - expected) < D("1e-11")
    first, second, third = (sum(v.values(), D(0)) for v in rep.series[1:4])
    assert abs(first - D(2) * 600 * D("0.04") / 3600) < D("1e-11")  # 12:15 .. 12:30
    assert second == D("0.03")  # 12:30 .. 12:45
    assert abs(third - D(2) * 300 * D("0.06") / 3600) < D("1e-11")  # 12:45 .. 12:50


def test_without_prices_the_report_measures_core_hours() -> None:
    rep = report([usage(cpu=2, elapsed_s=1800)], extra="")
    assert rep.currency is None
    assert rep.measure == "core-hours"
    assert bars_total(rep) == D(1)
    assert any("no prices" in note for note in rep.notes)


def test_overhead_on_a_node_with_two_runs_and_idle_capacity() -> None:
    # node n1 costs 4/h (1.0 per 15 minutes); over 12:00 .. 12:15:
    #   run A: 2 CPUs x 0.25 h x 0.5 = 0.25;  run B: 1 CPU x 0.25 h x 0.5 = 0.125
    #   overhead 1.0 - 0.375 = 0.625, shared 2:1: A 0.41666..., B 0.20833...
    # node n2 (listed, no run) costs 1.0: unallocated
    extra = PRICES + "  nodes: [{names: 'n[1-2]', node_hour: 4}]\n"
    runs = [
        usage(cpu=2, elapsed_s=900, account="physics", job_id="1"),
        usage(cpu=1, elapsed_s=900, account="chemistry", job_id="2"),
    ]
    rep = report(runs, extra=extra, hours=1)
    rows = {r.group: r for r in rep.rows}
    assert rows["physics"].allocated_cost == D("0.25")
    assert rows["chemistry"].allocated_cost == D("0.125")
    assert abs(rows["physics"].overhead - D("0.625") * 2 / 3) < D("1e-11")
    assert abs(rows["chemistry"].overhead - D("0.625") / 3) < D("1e-11")
    # the first interval costs exactly the two nodes; the next three only idle nodes
    assert abs(sum(rep.series[0].values(), D(0)) - D(1)) < D("1e-11")
    assert rep.unallocated == [D(1), D(2), D(2), D(2)]
    assert abs(rep.total.total_cost + rep.unallocated_cost - D(8)) < D("1e-11")  # 2 nodes x 1 h


def test_a_run_on_two_nodes_puts_half_its_cost_on_each() -> None:
    extra = (
        "pricing: {partitions: {compute: {cpu_hour: 1}}, nodes: [{names: 'n*', node_hour: 4}]}\n"
    )
    rep = report([usage(cpu=2, elapsed_s=900, nodes=("n1", "n2"))], extra=extra, hours=1)
    row = rep.rows[0]
    assert row.allocated_cost == D("0.5")
    assert row.overhead == D("1.5")  # 2 x (1.0 - 0.25)
    # a glob names the nodes runs used; they exist for the whole period: idle afterwards
    assert list(rep.unallocated) == [D(0), D(2), D(2), D(2)]


def test_a_run_costing_more_than_its_node_has_no_negative_overhead() -> None:
    extra = "pricing: {partitions: {compute: {cpu_hour: 10}}, nodes: [{names: n1, node_hour: 1}]}\n"
    row = report([usage(cpu=4, elapsed_s=900)], extra=extra, hours=1).rows[0]
    assert row.overhead == 0
    assert row.allocated_cost == 10


# --- bad input: no division by zero, no crash ------------------------------------------------


@pytest.mark.parametrize(
    "run",
    [
        usage(elapsed_s=0),
        usage(cpu=0, mem_mb=0, cpu_used_s="5", mem_used_mb="1"),
        usage(start_at=None, elapsed_s=0),
        usage(elapsed_s=0, cpu_used_s="0", mem_used_mb="0"),
    ],
    ids=["zero-length", "zero-cpus", "pending", "zero-everything"],
)
def test_degenerate_runs_give_clear_figures(run: RunUsage) -> None:
    rep = report([run])
    assert bars_total(rep) == rep.total.total_cost
    for row in rep.rows:
        assert row.cpu_util is None or row.cpu_util <= 1


def test_an_empty_period_has_no_rows_and_empty_bars() -> None:
    rep = report([])
    assert rep.rows == ()
    assert len(rep.series) == 8 and all(not v for v in rep.series)


def test_top_groups_and_other() -> None:
    runs = [usage(job_id=str(i), cpu=i + 1, account=f"acct{i}") for i in range(5)]
    rep = report(runs)
    shown, other = rep.top(2)
    assert [r.group for r in shown] == ["acct4", "acct3"]
    assert other is not None and other.runs == 3
    folded = rep.top_series(2)
    assert set().union(*folded) == {"acct4", "acct3", OTHER}
    assert sum((sum(v.values(), D(0)) for v in folded), D(0)) == bars_total(rep)


def test_right_sizing_hint_for_a_costly_low_utilisation_group() -> None:
    runs = [
        usage(cpu=32, cpu_used_s=str(int(2.1 * 3600)), account="physics"),
        usage(job_id="2", cpu=1, cpu_used_s="3500", account="chemistry"),
    ]
    rows = {r.group: r for r in report(runs).rows}
    assert rows["physics"].hint == "asked 32 cores, used 2.1 on average"
    assert rows["chemistry"].hint == ""


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("account", "physics"),
        ("user", "alice"),
        ("partition", "compute"),
        ("allocation", "phys-alloc"),
        ("job-name", "job"),
        ("job", "1001"),
    ],
)
def test_group_dimensions(by: str, expected: str) -> None:
    assert report([usage()], by=by).rows[0].group == expected


def test_unmapped_accounts_group_as_unmapped() -> None:
    group = group_function("allocation", config().accounts)
    assert group(usage(account="nobody")) == "(unmapped)"


def test_grid_aligns_on_utc_quarters() -> None:
    grid = Grid.of(T0 + timedelta(minutes=5), T0 + timedelta(minutes=50))
    assert len(grid) == 4
    assert [grid.seconds(i) for i in range(4)] == [600, 900, 900, 300]
    assert list(grid.split(0, 10**12)) == [(0, 600), (1, 900), (2, 900), (3, 300)]


def test_build_directly_with_unpriced_prices() -> None:
    prices = prices_for(config(""), None)
    rep = build([usage()], prices, lambda u: "g", Grid.of(T0, T0 + timedelta(hours=1)))
    assert rep.rows[0].group == "g"
    assert rep.value(rep.rows[0]) == 4
