"""Tests of the embedded rating engine and its catalog. Expected values are computed by hand."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker.errors import ConfigError, TrackerError, UnsafeFile
from slurm_tracker.rating import (
    Catalog,
    RateMissing,
    RateRule,
    Sku,
    Unit,
    UnknownSku,
    boundaries,
    catalog_from_api,
    catalog_from_data,
    dump_catalog,
    effective_rates,
    load_catalog_file,
    rate,
)

UTC = timezone.utc
HALF_MICRO = Fraction(1, 2_000_000)  # 0.5e-6, the most one rounding can move a value


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def rule(start: str, end: Optional[str], value: Any) -> dict[str, Any]:
    return {"effectiveFrom": start, "effectiveTo": end, "rate": value}


OPEN_2026 = rule("2026-01-01T00:00:00Z", None, 1)

#: The example catalog of the brief, plus a node-hour SKU and a SKU without rules.
EXAMPLE: dict[str, Any] = {
    "version": 1,
    "pulled_at": "2026-11-20T10:00:00Z",
    "units": [
        {
            "name": "core-hours",
            "ratedInUsd": False,
            "skus": [
                {"code": "SLURM_CPU_HOUR", "rules": [OPEN_2026]},
                {"code": "FREE_FOR_ALL"},
            ],
        },
        {
            "name": "usd",
            "ratedInUsd": True,
            "rules": [rule("2026-01-01T00:00:00Z", None, "0.04")],
            "skus": [
                {"code": "SLURM_NODE_HOUR", "rules": [rule("2026-01-01T00:00:00Z", None, 2.5)]},
                {
                    "code": "SLURM_GPU_HOUR",
                    "archived": False,
                    "rules": [
                        rule("2026-01-01T00:00:00Z", "2026-07-01T12:00:00Z", 2.5),
                        rule("2026-07-01T12:00:00Z", None, 2.0),
                    ],
                },
            ],
        },
    ],
}


def example() -> Catalog:
    return catalog_from_data(EXAMPLE, "example")


def problems_of(data: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        catalog_from_data(data, "test.yaml")
    return caught.value.problems


# --------------------------------------------------------------------------- rating


@pytest.mark.parametrize(
    ("sku", "quantity", "unit", "amount", "usd", "sku_rate", "unit_rate"),
    [
        # core-hours at rate 1, a unit not rated in USD: 12.5 x 1
        ("SLURM_CPU_HOUR", "12.5", "core-hours", "12.5", None, "1", None),
        # node-hours at rate 2.5 in a USD unit at 0.04: 10 x 2.5 = 25 units; 25 x 0.04 = 1.00
        ("SLURM_NODE_HOUR", "10", "usd", "25", "1.00", "2.5", "0.04"),
        # 0.1234567 x 2.5 = 0.30864175 -> 0.308642; x 0.04 = 0.01234567 -> 0.012346
        ("SLURM_NODE_HOUR", "0.1234567", "usd", "0.308642", "0.012346", "2.5", "0.04"),
        # ties round to even at the 6th place: 0.0000005 -> 0, 0.0000015 -> 0.000002
        ("SLURM_CPU_HOUR", "0.0000005", "core-hours", "0", None, "1", None),
        ("SLURM_CPU_HOUR", "0.0000015", "core-hours", "0.000002", None, "1", None),
        ("SLURM_CPU_HOUR", "0.0000025", "core-hours", "0.000002", None, "1", None),
        # more digits than the default 28-digit Decimal context: still exact
        (
            "SLURM_CPU_HOUR",
            "123456789012345678901234.5678915",
            "core-hours",
            "123456789012345678901234.567892",
            None,
            "1",
            None,
        ),
        # a SKU without rules has rate 1
        ("FREE_FOR_ALL", "7", "core-hours", "7", None, "1", None),
    ],
)
def test_rate_hand_computed(
    sku: str,
    quantity: str,
    unit: str,
    amount: str,
    usd: Optional[str],
    sku_rate: str,
    unit_rate: Optional[str],
) -> None:
    rated = rate(example(), sku, Decimal(quantity), at(2026, 3, 1), at(2026, 3, 1, 5))
    assert rated.unit == unit
    assert rated.amount == Decimal(amount)
    assert rated.amount.as_tuple().exponent == -6  # always quantized to 6 places
    if usd is None:
        assert rated.usd is None
    else:
        assert rated.usd == Decimal(usd)
    assert rated.sku_rate == Decimal(sku_rate)
    assert rated.unit_rate == (None if unit_rate is None else Decimal(unit_rate))


def test_usd_is_computed_from_the_exact_amount_not_the_rounded_one() -> None:
    catalog = catalog_from_data(
        {
            "units": [
                {
                    "name": "usd",
                    "ratedInUsd": True,
                    "rules": [rule("2026-01-01T00:00:00Z", None, 1000)],
                    "skus": [{"code": "X", "rules": [OPEN_2026]}],
                }
            ]
        },
        "inline",
    )
    # 0.0000004 units round to 0.000000, but cost 0.0004 USD exactly
    rated = rate(catalog, "X", Decimal("0.0000004"), at(2026, 2, 1), at(2026, 2, 2))
    assert rated.amount == 0
    assert rated.usd == Decimal("0.0004")


def test_gpu_rate_change_during_a_running_job() -> None:
    catalog = example()
    start, change, end = at(2026, 7, 1, 10), at(2026, 7, 1, 12), at(2026, 7, 1, 16)
    assert boundaries(catalog, "SLURM_GPU_HOUR", start, end) == [change]
    # 4 GPUs: 10:00-12:00 = 8 GPU-hours at 2.5 = 20 units = 0.80 USD
    before = rate(catalog, "SLURM_GPU_HOUR", Decimal(8), start, change)
    assert (before.amount, before.usd, before.sku_rate) == (
        Decimal(20),
        Decimal("0.8"),
        Decimal("2.5"),
    )
    # 12:00-16:00 = 16 GPU-hours at 2.0 = 32 units = 1.28 USD
    after = rate(catalog, "SLURM_GPU_HOUR", Decimal(16), change, end)
    assert (after.amount, after.usd, after.sku_rate) == (Decimal(32), Decimal("1.28"), Decimal(2))
    with pytest.raises(ValueError, match=r"straddles.*2026-07-01T12:00:00Z"):
        rate(catalog, "SLURM_GPU_HOUR", Decimal(24), start, end)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # rule boundaries are half-open: touching one at either end is not crossing it
        (at(2026, 7, 1, 10), at(2026, 7, 1, 12), []),
        (at(2026, 7, 1, 12), at(2026, 7, 1, 16), []),
        (at(2026, 7, 1, 12), at(2026, 7, 1, 12), []),
        (at(2026, 7, 1, 11, 59, 59), at(2026, 7, 1, 12, 0, 1), [at(2026, 7, 1, 12)]),
        # both ends of the first rule, and the unit rule's start
        (at(2025, 12, 1), at(2026, 8, 1), [at(2026, 1, 1), at(2026, 7, 1, 12)]),
    ],
)
def test_boundaries(start: datetime, end: datetime, expected: list[datetime]) -> None:
    assert boundaries(example(), "SLURM_GPU_HOUR", start, end) == expected


def test_boundaries_include_the_usd_unit_rules_only_when_the_unit_is_rated_in_usd() -> None:
    unit_rules = [
        rule("2026-01-01T00:00:00Z", "2026-05-01T00:00:00Z", "0.04"),
        rule("2026-05-01T00:00:00Z", None, "0.05"),
    ]
    data = {
        "units": [
            {
                "name": "usd",
                "ratedInUsd": True,
                "rules": unit_rules,
                "skus": [{"code": "A", "rules": [OPEN_2026]}],
            },
            {
                "name": "points",
                "ratedInUsd": False,
                "rules": unit_rules,  # ignored: the unit is not rated in USD
                "skus": [{"code": "B", "rules": [OPEN_2026]}],
            },
        ]
    }
    catalog = catalog_from_data(data, "inline")
    assert boundaries(catalog, "A", at(2026, 4, 1), at(2026, 6, 1)) == [at(2026, 5, 1)]
    assert boundaries(catalog, "B", at(2026, 4, 1), at(2026, 6, 1)) == []
    # 10 units x 0.05 USD after the change
    assert rate(catalog, "A", Decimal(10), at(2026, 5, 1), at(2026, 6, 1)).usd == Decimal("0.5")
    assert rate(catalog, "B", Decimal(10), at(2026, 4, 1), at(2026, 6, 1)).usd is None


def month_starts(start: datetime, end: datetime) -> list[datetime]:
    """Month starts strictly inside (start, end): the cuts another stage makes."""
    cuts: list[datetime] = []
    year, month = start.year, start.month
    while True:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        cut = at(year, month, 1)
        if cut >= end:
            return cuts
        cuts.append(cut)


def test_month_and_rule_boundaries_combined_give_pieces_inside_one_period() -> None:
    catalog = example()
    start, end = at(2026, 6, 30, 20), at(2026, 7, 1, 20)
    rule_cuts = boundaries(catalog, "SLURM_GPU_HOUR", start, end)
    month_cuts = month_starts(start, end)
    assert rule_cuts == [at(2026, 7, 1, 12)]  # rule boundaries only, no month ends
    assert month_cuts == [at(2026, 7, 1)]
    edges = [start, *sorted(set(rule_cuts) | set(month_cuts)), end]
    pieces = list(zip(edges, edges[1:]))
    assert pieces == [
        (at(2026, 6, 30, 20), at(2026, 7, 1)),
        (at(2026, 7, 1), at(2026, 7, 1, 12)),
        (at(2026, 7, 1, 12), at(2026, 7, 1, 20)),
    ]
    # 1 GPU: 4 h x 2.5 + 12 h x 2.5 + 8 h x 2.0 = 10 + 30 + 16 units
    amounts = []
    for piece_start, piece_end in pieces:
        assert boundaries(catalog, "SLURM_GPU_HOUR", piece_start, piece_end) == []
        hours = Decimal(int((piece_end - piece_start).total_seconds())) / 3600
        amounts.append(rate(catalog, "SLURM_GPU_HOUR", hours, piece_start, piece_end).amount)
    assert amounts == [10, 30, 16]


def test_rate_missing_before_the_first_rule() -> None:
    with pytest.raises(RateMissing) as caught:
        rate(example(), "SLURM_GPU_HOUR", Decimal(1), at(2025, 12, 31), at(2025, 12, 31, 1))
    message = str(caught.value)
    assert "SLURM_GPU_HOUR" in message
    assert "2025-12-31T00:00:00Z" in message
    assert "add a rule" in message
    assert caught.value.sku == "SLURM_GPU_HOUR"
    assert caught.value.at == at(2025, 12, 31)


def test_rate_missing_in_a_gap_and_for_the_usd_unit() -> None:
    catalog = catalog_from_data(
        {
            "units": [
                {
                    "name": "usd",
                    "ratedInUsd": True,
                    "rules": [rule("2026-03-01T00:00:00Z", None, 1)],
                    "skus": [
                        {
                            "code": "GAPPY",
                            "rules": [
                                rule("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 1),
                                rule("2026-04-01T00:00:00Z", None, 1),
                            ],
                        }
                    ],
                }
            ]
        },
        "inline",
    )
    with pytest.raises(RateMissing, match="no rate for SKU 'GAPPY' at 2026-02-15"):
        rate(catalog, "GAPPY", Decimal(1), at(2026, 2, 15), at(2026, 2, 16))
    with pytest.raises(RateMissing, match="no USD rate for unit 'usd'") as caught:
        rate(catalog, "GAPPY", Decimal(1), at(2026, 1, 15), at(2026, 1, 16))
    assert caught.value.unit == "usd"
    assert rate(catalog, "GAPPY", Decimal(3), at(2026, 4, 2), at(2026, 4, 3)).usd == 3


@pytest.mark.parametrize("when", [at(1990, 1, 1), at(2026, 7, 1, 12), at(2100, 1, 1)])
def test_sku_without_rules_has_rate_1_at_any_time(when: datetime) -> None:
    rated = rate(example(), "FREE_FOR_ALL", Decimal("2.5"), when, when + timedelta(hours=1))
    assert (rated.amount, rated.sku_rate, rated.usd) == (Decimal("2.5"), Decimal(1), None)


def test_unknown_sku_is_a_domain_error_naming_it() -> None:
    with pytest.raises(UnknownSku, match=r"'NOPE'.*SLURM_CPU_HOUR") as caught:
        rate(example(), "NOPE", Decimal(1), at(2026, 3, 1), at(2026, 3, 2))
    assert isinstance(caught.value, RateMissing)
    assert isinstance(caught.value, TrackerError)
    with pytest.raises(UnknownSku):
        boundaries(example(), "NOPE", at(2026, 3, 1), at(2026, 3, 2))


@pytest.mark.parametrize(
    ("start", "end", "quantity", "match"),
    [
        (datetime(2026, 3, 1), at(2026, 3, 2), "1", "no timezone"),
        (at(2026, 3, 2), at(2026, 3, 1), "1", "ends .* before it starts"),
        (at(2026, 3, 1), at(2026, 3, 2), "NaN", "non-finite"),
    ],
)
def test_rate_refuses_bad_arguments(
    start: datetime, end: datetime, quantity: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        rate(example(), "SLURM_CPU_HOUR", Decimal(quantity), start, end)


def test_effective_rates() -> None:
    lines = {line.sku: line for line in effective_rates(example(), at(2026, 8, 1))}
    assert list(lines) == sorted(lines)
    gpu = lines["SLURM_GPU_HOUR"]
    assert (gpu.unit, gpu.rated_in_usd, gpu.sku_rate, gpu.unit_rate) == (
        "usd",
        True,
        Decimal(2),
        Decimal("0.04"),
    )
    assert [r.rate for r in gpu.sku_rules] == [Decimal("2.5"), Decimal(2)]
    assert len(gpu.unit_rules) == 1
    cpu = lines["SLURM_CPU_HOUR"]
    assert (cpu.unit, cpu.rated_in_usd, cpu.sku_rate, cpu.unit_rate) == (
        "core-hours",
        False,
        Decimal(1),
        None,
    )
    assert lines["FREE_FOR_ALL"].sku_rate == 1
    before = {line.sku: line for line in effective_rates(example(), at(2025, 1, 1))}
    assert before["SLURM_GPU_HOUR"].sku_rate is None
    assert before["SLURM_GPU_HOUR"].unit_rate is None
    assert before["FREE_FOR_ALL"].sku_rate == 1


# --------------------------------------------------------------------------- properties

BASE = at(2026, 1, 1)
HORIZON_S = 120 * 86400
rates = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False)


@st.composite
def periods(draw: st.DrawFn) -> tuple[RateRule, ...]:
    """Contiguous rules from BASE on, the last one open-ended."""
    cuts = sorted(draw(st.sets(st.integers(1, HORIZON_S - 1), max_size=4)))
    edges = [0, *cuts]
    values = draw(st.lists(rates, min_size=len(edges), max_size=len(edges)))
    return tuple(
        RateRule(
            BASE + timedelta(seconds=edge),
            BASE + timedelta(seconds=edges[i + 1]) if i + 1 < len(edges) else None,
            values[i],
        )
        for i, edge in enumerate(edges)
    )


@st.composite
def priced_catalogs(draw: st.DrawFn) -> Catalog:
    usd = draw(st.booleans())
    unit = Unit("u", usd, draw(periods()) if usd else ())
    return Catalog(units={"u": unit}, skus={"S": Sku("S", "u", draw(periods()))})


def overlap_s(start: int, end: int, rule: RateRule) -> int:
    lo = max(start, int((rule.effective_from_at - BASE).total_seconds()))
    hi = (
        end
        if rule.effective_to_at is None
        else min(end, int((rule.effective_to_at - BASE).total_seconds()))
    )
    return max(0, hi - lo)


def oracle(
    catalog: Catalog, start: int, end: int, per_second: Decimal
) -> tuple[Fraction, Fraction]:
    """Exact amount and USD of [start, end) seconds after BASE, straight from the rules."""
    amount = usd = Fraction(0)
    unit = catalog.units["u"]
    for sku_rule in catalog.skus["S"].rules:
        seconds = overlap_s(start, end, sku_rule)
        amount += Fraction(per_second) * seconds * Fraction(sku_rule.rate)
        for unit_rule in unit.usd_rules:
            lo = max(start, int((unit_rule.effective_from_at - BASE).total_seconds()))
            hi = end
            if unit_rule.effective_to_at is not None:
                hi = min(end, int((unit_rule.effective_to_at - BASE).total_seconds()))
            both = overlap_s(lo, hi, sku_rule) if hi > lo else 0
            usd += Fraction(per_second) * both * Fraction(sku_rule.rate) * Fraction(unit_rule.rate)
    return amount, usd


@settings(max_examples=150, deadline=None)
@given(
    catalog=priced_catalogs(),
    span=st.tuples(st.integers(0, HORIZON_S + 30 * 86400), st.integers(0, 40 * 86400)),
    per_second=st.decimals(min_value=0, max_value=10, places=6),
    extra=st.lists(st.floats(min_value=0, max_value=1), max_size=5),
)
def test_splitting_anywhere_conserves_the_exact_amount(
    catalog: Catalog, span: tuple[int, int], per_second: Decimal, extra: list[float]
) -> None:
    start_s, length_s = span
    end_s = start_s + length_s
    start, end = BASE + timedelta(seconds=start_s), BASE + timedelta(seconds=end_s)
    cuts = set(boundaries(catalog, "S", start, end)) | set(month_starts(start, end))
    cuts |= {BASE + timedelta(seconds=start_s + int(f * length_s)) for f in extra}
    edges = [start, *sorted(c for c in cuts if start < c < end), end]
    exact_amount = exact_usd = Fraction(0)
    rounded_amount = rounded_usd = Decimal(0)
    for piece_start, piece_end in zip(edges, edges[1:]):
        quantity = per_second * int((piece_end - piece_start).total_seconds())
        rated = rate(catalog, "S", quantity, piece_start, piece_end)
        exact = Fraction(quantity) * Fraction(rated.sku_rate)
        exact_amount += exact
        rounded_amount += rated.amount
        if rated.usd is not None:
            assert rated.unit_rate is not None
            exact_usd += exact * Fraction(rated.unit_rate)
            rounded_usd += rated.usd
    n = len(edges) - 1
    whole_amount, whole_usd = oracle(catalog, start_s, end_s, per_second)
    assert exact_amount == whole_amount
    assert abs(Fraction(rounded_amount) - whole_amount) <= n * HALF_MICRO
    assert exact_usd == whole_usd
    assert abs(Fraction(rounded_usd) - whole_usd) <= n * HALF_MICRO


@settings(max_examples=100, deadline=None)
@given(
    quantity=st.decimals(min_value=0, max_value=10**6, places=7),
    fractions_=st.lists(st.integers(1, 3599), max_size=6, unique=True),
)
def test_splitting_one_period_matches_the_whole_event(
    quantity: Decimal, fractions_: list[int]
) -> None:
    catalog = example()
    start = at(2026, 3, 1, 10)
    edges_s = [0, *sorted(fractions_), 3600]
    whole = rate(catalog, "SLURM_NODE_HOUR", quantity, start, start + timedelta(hours=1))
    whole_exact = Fraction(quantity) * Fraction(whole.sku_rate)
    pieces = []
    remaining = quantity
    for i, (lo, hi) in enumerate(zip(edges_s, edges_s[1:])):
        # proportional quantities, the last piece taking what is left so they add up exactly
        share = (
            remaining if i == len(edges_s) - 2 else (quantity * hi / 3600 - quantity * lo / 3600)
        )
        share = share.quantize(Decimal("1e-12")) if i < len(edges_s) - 2 else share
        remaining -= share
        piece = rate(
            catalog,
            "SLURM_NODE_HOUR",
            share,
            start + timedelta(seconds=lo),
            start + timedelta(seconds=hi),
        )
        pieces.append((share, piece))
    assert sum(Fraction(share) * Fraction(p.sku_rate) for share, p in pieces) == whole_exact
    rounded_sum = sum((p.amount for _, p in pieces), Decimal(0))
    assert abs(Fraction(rounded_sum) - whole_exact) <= len(pieces) * HALF_MICRO


EVENTS = [
    ("SLURM_CPU_HOUR", "12.5", at(2026, 3, 1), at(2026, 3, 1, 1)),
    ("SLURM_NODE_HOUR", "10", at(2026, 3, 1), at(2026, 3, 1, 2)),
    ("SLURM_GPU_HOUR", "8", at(2026, 7, 1, 10), at(2026, 7, 1, 12)),
    ("SLURM_GPU_HOUR", "16", at(2026, 7, 1, 12), at(2026, 7, 1, 16)),
    ("SLURM_GPU_HOUR", "0.3333333", at(2026, 8, 1), at(2026, 8, 1, 0, 20)),
    ("FREE_FOR_ALL", "0.0000015", at(2026, 8, 1), at(2026, 8, 1, 0, 20)),
]


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(len(EVENTS))))
def test_rating_does_not_depend_on_the_order_of_events(order: list[int]) -> None:
    catalog = example()
    in_order = [rate(catalog, s, Decimal(q), a, b) for s, q, a, b in EVENTS]
    shuffled = {}
    for index in order:
        sku, quantity, start, end = EVENTS[index]
        shuffled[index] = rate(catalog, sku, Decimal(quantity), start, end)
    assert [shuffled[i] for i in range(len(EVENTS))] == in_order
    assert sum(shuffled[i].amount for i in order) == sum(r.amount for r in in_order)


# --------------------------------------------------------------------------- validation


def test_valid_example_reads_rates_exactly() -> None:
    catalog = example()
    assert catalog.units["usd"].usd_rules[0].rate == Decimal("0.04")
    assert catalog.skus["SLURM_GPU_HOUR"].unit == "usd"
    assert catalog.pulled_at == at(2026, 11, 20, 10)
    assert catalog.version == 1


def test_yaml_floats_become_decimals_from_their_text() -> None:
    # what config.py hands over: plain safe_load, floats and datetimes already made
    section = yaml.safe_load(
        "units:\n"
        "  - name: usd\n"
        "    ratedInUsd: true\n"
        "    rules: [{effectiveFrom: 2026-01-01T00:00:00Z, rate: 0.1}]\n"
        "    skus: [{code: X, rules: [{effectiveFrom: 2026-01-01T00:00:00+02:00, rate: 1.1}]}]\n"
    )
    assert isinstance(section["units"][0]["rules"][0]["rate"], float)
    catalog = catalog_from_data(section, "config.yaml")
    assert catalog.units["usd"].usd_rules[0].rate == Decimal("0.1")  # not 0.1000000000000000055
    sku_rule = catalog.skus["X"].rules[0]
    assert sku_rule.rate == Decimal("1.1")
    assert sku_rule.effective_from_at == at(2025, 12, 31, 22)
    assert sku_rule.effective_from_at.tzinfo == UTC
    # 3 x 1.1 x 0.1 = 0.33 exactly (in floats it is 0.33000000000000007)
    assert rate(catalog, "X", Decimal(3), at(2026, 2, 1), at(2026, 2, 2)).usd == Decimal("0.33")


def test_gaps_between_rules_are_allowed() -> None:
    catalog = catalog_from_data(
        {
            "units": [
                {
                    "name": "u",
                    "ratedInUsd": False,
                    "skus": [
                        {
                            "code": "A",
                            "rules": [
                                rule("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 1),
                                rule("2026-03-01T00:00:00Z", None, 2),
                            ],
                        }
                    ],
                }
            ]
        },
        "inline",
    )
    assert len(catalog.skus["A"].rules) == 2


def unit_with(**fields: Any) -> dict[str, Any]:
    return {"units": [{"name": "u", "ratedInUsd": False, **fields}]}


def sku_with(*rules: Any, **fields: Any) -> dict[str, Any]:
    return unit_with(skus=[{"code": "A", "rules": list(rules), **fields}])


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            sku_with(rule("2026-01-01T00:00:00Z", None, 1), rule("2026-06-01T00:00:00Z", None, 2)),
            ["SKU 'A': rules 1 (2026-01-01T00:00:00Z to open) and 2 (2026-06-01T00:00:00Z"],
        ),
        (
            {
                "units": [
                    {
                        "name": "usd",
                        "ratedInUsd": True,
                        "rules": [
                            rule("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", 1),
                            rule("2026-02-01T00:00:00Z", None, 2),
                        ],
                    }
                ]
            },
            ["unit 'usd': rules 1", "overlap"],
        ),
        (
            sku_with(rule("2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z", 1)),
            ["effectiveTo 2026-02-01T00:00:00Z is not after effectiveFrom"],
        ),
        (sku_with(rule("2026-01-01T00:00:00Z", None, -0.5)), ["rate -0.5 is negative"]),
        (sku_with(rule("2026-01-01T00:00:00Z", None, "abc")), ["rate must be a finite number"]),
        (sku_with(rule("2026-01-01T00:00:00Z", None, True)), ["rate must be a finite number"]),
        (sku_with(rule("2026-01-01T00:00:00Z", None, float("inf"))), ["finite number"]),
        (sku_with(rule("2026-01-01T00:00:00", None, 1)), ["has no UTC offset"]),
        (sku_with(rule("yesterday", None, 1)), ["'yesterday' is not an RFC 3339 timestamp"]),
        (sku_with({"rate": 1}), ["effectiveFrom is missing"]),
        (sku_with({"effectiveFrom": "2026-01-01T00:00:00Z"}), ["rate is missing"]),
        (sku_with({**OPEN_2026, "rat": 1}), ["unknown key(s) 'rat'"]),
        (unit_with(skus=[{"code": "A", "price": 1}]), ["SKU 'A': unknown key(s) 'price'"]),
        (unit_with(colour="blue"), ["unit 'u': unknown key(s) 'colour'"]),
        ({"units": [], "extra": 1}, ["the catalog: unknown key(s) 'extra'"]),
        (
            {
                "units": [
                    {"name": "a", "ratedInUsd": False, "skus": [{"code": "X"}]},
                    {"name": "b", "ratedInUsd": False, "skus": [{"code": "X"}]},
                ]
            },
            ["SKU 'X' appears twice"],
        ),
        (
            {"units": [{"name": "a", "ratedInUsd": False}, {"name": "a", "ratedInUsd": False}]},
            ["unit 'a' appears twice"],
        ),
        ({"units": [{"name": "usd", "ratedInUsd": True}]}, ["rated in USD but has no rules"]),
        ({"units": [{"name": "u", "ratedInUsd": "yes"}]}, ["ratedInUsd must be true or false"]),
        ({"units": [{"ratedInUsd": False}]}, ["units[1]: name must be a non-empty string"]),
        (unit_with(skus=[{"rules": []}]), ["skus[1]: code must be a non-empty string"]),
        (unit_with(skus=[{"code": "A", "archived": "no"}]), ["archived must be true or false"]),
        (unit_with(skus="A"), ["skus must be a list"]),
        (sku_with("2026-01-01"), ["rule 1 must be a mapping"]),
        (unit_with(skus=[{"code": "A", "rules": {"rate": 1}}]), ["rules must be a list"]),
        ({"units": "all"}, ["units must be a list"]),
        ({}, ["units is missing"]),
        ({"version": 2, "units": []}, ["catalog version 2 is not understood"]),
        ({"version": "1", "units": []}, ["version must be an integer"]),
        ({"pulled_at": 5, "units": []}, ["pulled_at must be an RFC 3339 timestamp"]),
        (["not", "a", "mapping"], ["the catalog must be a mapping"]),
    ],
)
def test_bad_catalogs_are_rejected(data: Any, fragments: list[str]) -> None:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0]


def test_every_problem_is_listed_in_one_error() -> None:
    data = {
        "version": 1,
        "colour": "blue",
        "units": [
            {
                "name": "usd",
                "ratedInUsd": True,
                "skus": [
                    {
                        "code": "GPU",
                        "rules": [
                            rule("2026-01-01T00:00:00Z", None, -2.5),
                            rule("2026-02-01T00:00:00Z", "2026-09-01T00:00:00Z", 2),
                        ],
                    },
                    {"code": "GPU", "price": 3},
                ],
            },
            {"name": "usd", "ratedInUsd": False},
        ],
    }
    problems = problems_of(data)
    expected = [
        "unknown key(s) 'colour'",
        "unit 'usd' is rated in USD but has no rules",
        "rate -2.5 is negative",
        "rules 1 (2026-01-01T00:00:00Z to open) and 2",  # overlap, though rule 1 is bad too
        "unknown key(s) 'price'",
        "SKU 'GPU' appears twice",
        "unit 'usd' appears twice",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), fragment


# --------------------------------------------------------------------------- the YAML file

EXAMPLE_FILE = """\
version: 1
pulled_at: "2026-11-20T10:00:00Z"
units:
  - name: core-hours
    ratedInUsd: false
    skus:
      - code: SLURM_CPU_HOUR
        rules: [{effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: null, rate: 1}]
  - name: usd
    ratedInUsd: true
    rules: [{effectiveFrom: 2026-01-01T00:00:00Z, effectiveTo: null, rate: 0.04}]
    skus:
      - code: SLURM_GPU_HOUR
        archived: false
        rules:
          - {effectiveFrom: "2026-01-01T00:00:00Z", effectiveTo: "2026-07-01T00:00:00Z", rate: 2.5}
          - {effectiveFrom: "2026-07-01T00:00:00Z", effectiveTo: null, rate: 2.0}
"""


def write(tmp: Path, text: str) -> Path:
    path = tmp / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_catalog_file(tmp_path: Path) -> None:
    catalog = load_catalog_file(write(tmp_path, EXAMPLE_FILE))
    assert catalog.source == str(tmp_path / "catalog.yaml")
    assert catalog.units["usd"].usd_rules[0].rate == Decimal("0.04")
    assert [r.rate for r in catalog.skus["SLURM_GPU_HOUR"].rules] == [Decimal("2.5"), 2]
    assert catalog.units["usd"].usd_rules[0].effective_from_at == at(2026, 1, 1)
    # 10 GPU-hours x 2.5 x 0.04
    rated = rate(catalog, "SLURM_GPU_HOUR", Decimal(10), at(2026, 2, 1), at(2026, 2, 2))
    assert rated.usd == 1


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # problems carry file:line
        (
            EXAMPLE_FILE.replace("rate: 2.5}", "rate: -2.5}"),
            [":16: SKU 'SLURM_GPU_HOUR' rule 1: rate -2.5 is negative"],
        ),
        (
            EXAMPLE_FILE.replace("    archived: false", "    archivd: false"),
            [":13: SKU 'SLURM_GPU_HOUR': unknown key(s) 'archivd'"],
        ),
        (
            EXAMPLE_FILE.replace(
                '"2026-07-01T00:00:00Z", effectiveTo: null',
                '"2026-06-01T00:00:00Z", effectiveTo: null',
            ),
            [":17: SKU 'SLURM_GPU_HOUR': rules 1", "overlap"],
        ),
        (EXAMPLE_FILE.replace("version: 1\n", ""), ["version is missing"]),
        (EXAMPLE_FILE + "units: []\n", [":18: key 'units' appears twice"]),
        ("units: [\n", ["not valid YAML"]),
        ("", ["the file is empty"]),
        (
            "version: 1\n"
            "units:\n"
            "  - name: x\n"
            "    ratedInUsd: false\n"
            "    skus: [{code: A, rules: [{effectiveFrom: 2026-01-01T00:00:00Z, rate: .inf}]}]\n",
            [":5: SKU 'A' rule 1: rate must be a finite number"],
        ),
    ],
    ids=[
        "negative-rate",
        "unknown-key",
        "overlap",
        "no-version",
        "duplicate-key",
        "bad-yaml",
        "empty",
        "infinite-rate",
    ],
)
def test_bad_catalog_files(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_catalog_file(path)
    assert caught.value.source == str(path)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the catalog file"):
        load_catalog_file(tmp_path / "nope.yaml")


def test_missing_catalog_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the catalog file: .* does not exist"):
        load_catalog_file(tmp_path / "nowhere" / "catalog.yaml")


# ---------------------------------------------------------- hostile catalog files

KEY = (
    "pwt_"
    + base64.urlsafe_b64encode(b"activate.example.org").decode().rstrip("=")
    + ".q7Zr2LmX9vKp4WcT1nYb8HsJd3FgE6uAo0RiVe5x"
)


def shows_key(text: str) -> bool:
    return any(KEY[i : i + 8] in text for i in range(1, len(KEY) - 7))


def catalog_problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_catalog_file(write(tmp_path, text))
    assert len(caught.value.problems) == 1, caught.value.problems
    return caught.value.problems[0]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "version: 1\nunits: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        "".join(f"{' ' * depth}a:\n" for depth in range(10_000)),
    ],
    ids=["lists", "mappings", "block-mappings"],
)
def test_a_deeply_nested_catalog_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    problem = catalog_problem(tmp_path, text)
    assert "cannot be read: nested too deeply: more than 50 levels" in problem


def test_an_alias_bomb_in_a_catalog_file_is_refused(tmp_path: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append("units: [{name: *a8}]")
    problem = catalog_problem(tmp_path, "\n".join(lines) + "\n")
    assert "cannot be read: aliases (*name) repeat more than 10000 values" in problem


def test_a_catalog_that_contains_itself_is_refused(tmp_path: Path) -> None:
    text = "version: 1\nunits: &u [{name: x, ratedInUsd: false, skus: *u}]\n"
    problem = catalog_problem(tmp_path, text)
    assert ":2: cannot be read: the alias *u is used inside the value it names" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: " + "9" * 5000 + "\n", ":1: cannot be read: cannot read '9999"),
        ("version: !!int abc\n", ":1: cannot be read: cannot read 'abc' as int"),
        ("version: !!int\n", ":1: cannot be read: cannot read '' as int"),
        ("version: !!float\n", ":1: cannot be read: cannot read '' as float"),
        ("version: !!float abc\n", ":1: cannot be read: cannot read 'abc' as float"),
        ("version: !!timestamp abc\n", ":1: cannot be read: cannot read 'abc' as timestamp"),
        ("version: !!timestamp 2026-13-45\n", ":1: cannot be read: cannot read '2026-13-45'"),
        ("version: 1\nunits: [{? [a]: 1}]\n", ":2: cannot be read: while constructing a mapping"),
        (
            "version: 1\nunits: [{name: u, ratedInUsd: false, skus: [{code: A, rules: "
            "[{effectiveFrom: '2026-01-01T00:00:00Z', rate: 1.0e+999999999}]}]}]\n",
            ":2: cannot be read: the number 1.0e+999999999 is out of range",
        ),
    ],
)
def test_values_that_cannot_be_read_are_config_errors(
    tmp_path: Path, text: str, expected: str
) -> None:
    problem = catalog_problem(tmp_path, text)
    assert expected in problem, problem
    assert len(problem) < 300


def test_large_but_sane_rates_are_read(tmp_path: Path) -> None:
    text = EXAMPLE_FILE.replace("rate: 2.5}", "rate: 1.0e+900}")
    catalog = load_catalog_file(write(tmp_path, text))
    assert catalog.skus["SLURM_GPU_HOUR"].rules[0].rate == Decimal("1e900")


@pytest.mark.parametrize("content", [KEY + "\n", f"- {KEY}\n", "12345\n"])
def test_a_file_that_is_no_catalog_is_not_echoed(tmp_path: Path, content: str) -> None:
    problem = catalog_problem(tmp_path, content)
    assert "not a slurm-tracker catalog (its top level is not a mapping" in problem
    assert not shows_key(problem)
    assert "12345" not in problem


def test_syntax_errors_in_a_catalog_file_do_not_quote_the_file(tmp_path: Path) -> None:
    problem = catalog_problem(tmp_path, f"version: 1\nunits: *{KEY[4:30]}\n")
    assert ":2: not valid YAML: " in problem
    assert not shows_key(problem), problem
    assert "units:" not in problem  # PyYAML's snippet of the line is not shown


def test_a_secret_looking_duplicate_key_is_not_echoed(tmp_path: Path) -> None:
    text = EXAMPLE_FILE.replace("units:\n", f"units:\n  - {{{KEY}: 1, {KEY}: 2}}\n", 1)
    with pytest.raises(ConfigError) as caught:
        load_catalog_file(write(tmp_path, text))
    (problem,) = [item for item in caught.value.problems if "appears twice" in item]
    assert problem.endswith(":4: key 'pwt_… (redacted)' appears twice in one mapping"), problem


def test_a_symlinked_catalog_file_is_refused(tmp_path: Path) -> None:
    real = write(tmp_path, EXAMPLE_FILE)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(UnsafeFile, match=r"catalog file .*link.yaml is a symbolic link"):
        load_catalog_file(link)


def test_a_catalog_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE_FILE)
    path.chmod(0o646)
    with pytest.raises(UnsafeFile, match=r"is writable by others"):
        load_catalog_file(path)


def test_a_catalog_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "CI runs as root: chown needs it"
    path = write(tmp_path, EXAMPLE_FILE)
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeFile, match=r"belongs to .*65534"):
        load_catalog_file(path)


def test_a_catalog_file_in_a_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    path = write(folder, EXAMPLE_FILE)
    folder.chmod(0o777)
    with pytest.raises(UnsafeFile, match=r"directory .*shared is writable by"):
        load_catalog_file(path)


def test_a_catalog_file_owned_by_root_and_0644_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE_FILE)
    path.chmod(0o644)
    assert load_catalog_file(path).skus


def round_trip(catalog: Catalog) -> Catalog:
    with tempfile.TemporaryDirectory() as tmp:
        return load_catalog_file(write(Path(tmp), dump_catalog(catalog)))


def test_dump_load_round_trip_of_the_example() -> None:
    catalog = example()
    text = dump_catalog(catalog)
    assert text.count("version: 1") == 1
    assert 'pulled_at: "2026-11-20T10:00:00Z"' in text
    assert "rate: 0.04}" in text  # rates written as exact decimal text
    loaded = round_trip(catalog)
    assert loaded == catalog
    assert loaded.skus["FREE_FOR_ALL"].rules == ()  # still "no rules", i.e. rate 1


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12
).filter(lambda s: s.strip() != "")
exact_rates = st.one_of(
    st.decimals(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False),
    st.sampled_from([Decimal("1E+3"), Decimal("0.0000001"), Decimal("2.50"), Decimal("0")]),
)
instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@st.composite
def rule_lists(draw: st.DrawFn) -> tuple[RateRule, ...]:
    starts = sorted(draw(st.sets(instants, max_size=3)))
    rules = []
    for i, start in enumerate(starts):
        end = (
            starts[i + 1]
            if i + 1 < len(starts)
            else draw(st.none() | st.just(start + timedelta(days=1)))
        )
        rules.append(RateRule(start, end, draw(exact_rates)))
    return tuple(rules)


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    unit_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    units = {}
    for name in unit_names:
        usd_rules = draw(rule_lists())
        units[name] = Unit(name, bool(usd_rules) and draw(st.booleans()), usd_rules)
    codes = draw(st.lists(names, max_size=4, unique=True))
    skus = {
        code: Sku(code, draw(st.sampled_from(unit_names)), draw(rule_lists()), draw(st.booleans()))
        for code in codes
    }
    pulled_at = draw(st.none() | instants)
    return Catalog(units=units, skus=skus, pulled_at=pulled_at)


@settings(max_examples=100, deadline=None)
@given(catalog=catalogs())
def test_dump_load_round_trip(catalog: Catalog) -> None:
    loaded = round_trip(catalog)
    assert loaded == catalog
    for code, sku in catalog.skus.items():
        assert [r.rate for r in loaded.skus[code].rules] == [r.rate for r in sku.rules]


# --------------------------------------------------------------------------- the API

# Shapes of GET .../units, .../units/{name}/skus?includeArchived=true and .../skus/{id}/rules,
# as JSON text decoded the usual way (numbers become floats).
API_UNITS = """[
 {"id": "u-1", "organizationId": "org-1", "name": "core-hours", "ratedInUsd": false,
  "createdAt": "2025-12-01T09:00:00Z", "Rules": null},
 {"id": "u-2", "organizationId": "org-1", "name": "usd", "ratedInUsd": true,
  "createdAt": "2025-12-01T09:00:00Z",
  "Rules": [
   {"id": "ur-2", "unitId": "u-2", "effectiveFrom": "2026-06-01T00:00:00Z", "rate": 0.05},
   {"id": "ur-1", "unitId": "u-2", "effectiveFrom": "2026-01-01T00:00:00Z",
    "effectiveTo": "2026-06-01T00:00:00Z", "rate": 0.04}]}
]"""
API_SKUS = """{
 "core-hours": [
  {"id": "s-1", "organizationId": "org-1", "code": "SLURM_CPU_HOUR", "name": "CPU hour",
   "unitId": "u-1", "type": "Compute", "subtype": "CoreHour", "currentRate": 1}],
 "usd": [
  {"id": "s-2", "organizationId": "org-1", "code": "SLURM_GPU_HOUR", "name": "GPU hour",
   "unitId": "u-2", "type": "Compute", "subtype": "GpuHour", "currentRate": 2.0,
   "description": "A100"},
  {"id": "s-3", "organizationId": "org-1", "code": "SLURM_OLD_GPU", "name": "Old GPU hour",
   "unitId": "u-2", "type": "Compute", "subtype": "GpuHour", "currentRate": 1.5,
   "deletedAt": "2026-04-01T00:00:00Z"}]
}"""
API_RULES = """{
 "s-1": [],
 "s-2": [
  {"id": "r-2", "customSkuId": "s-2", "effectiveFrom": "2026-07-01T00:00:00Z", "rate": 2.0},
  {"id": "r-1", "customSkuId": "s-2", "effectiveFrom": "2026-01-01T00:00:00Z",
   "effectiveTo": "2026-07-01T00:00:00Z", "rate": 2.5}],
 "s-3": [
  {"id": "r-3", "customSkuId": "s-3", "effectiveFrom": "2025-01-01T00:00:00Z", "rate": 1.5}]
}"""
PULLED_AT = at(2026, 11, 20, 10)


def api_catalog(**changes: Any) -> Catalog:
    units = changes.get("units", json.loads(API_UNITS))
    skus = changes.get("skus", json.loads(API_SKUS))
    rules = changes.get("rules", json.loads(API_RULES))
    return catalog_from_api(units, skus, rules, pulled_at=PULLED_AT)


def test_catalog_from_api() -> None:
    catalog = api_catalog()
    assert catalog.pulled_at == PULLED_AT
    assert catalog.units["core-hours"] == Unit("core-hours", False, ())
    usd = catalog.units["usd"]
    assert usd.rated_in_usd
    assert [(r.effective_from_at, r.rate) for r in usd.usd_rules] == [
        (at(2026, 1, 1), Decimal("0.04")),  # sorted by effectiveFrom, floats read from text
        (at(2026, 6, 1), Decimal("0.05")),
    ]
    assert usd.usd_rules[1].effective_to_at is None  # effectiveTo absent = open-ended
    assert catalog.skus["SLURM_CPU_HOUR"] == Sku("SLURM_CPU_HOUR", "core-hours", (), False)
    gpu = catalog.skus["SLURM_GPU_HOUR"]
    assert (gpu.unit, gpu.archived, [r.rate for r in gpu.rules]) == (
        "usd",
        False,
        [Decimal("2.5"), Decimal(2)],
    )
    old = catalog.skus["SLURM_OLD_GPU"]
    assert old.archived
    # past usage of an archived SKU still rates: 4 x 1.5 = 6 units x 0.04 = 0.24 USD
    assert rate(
        catalog, "SLURM_OLD_GPU", Decimal(4), at(2026, 3, 1), at(2026, 3, 2)
    ).usd == Decimal("0.24")
    # and the pulled catalog survives the file
    assert round_trip(catalog) == catalog


def test_catalog_from_api_with_decimal_json() -> None:
    units = json.loads(API_UNITS, parse_float=Decimal)
    skus = json.loads(API_SKUS, parse_float=Decimal)
    rules = json.loads(API_RULES, parse_float=Decimal)
    assert api_catalog(units=units, skus=skus, rules=rules) == api_catalog()


def test_api_fixtures_follow_the_contract(openapi_contract: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    contract = json.loads(openapi_contract.read_text(encoding="utf-8"))

    def check(item: Any, schema: str) -> None:
        root = {"$ref": f"#/components/schemas/{schema}", "components": contract["components"]}
        jsonschema.Draft202012Validator(root).validate(item)

    for unit in json.loads(API_UNITS):
        check(unit, "Unit")
        for unit_rule in unit["Rules"] or []:
            check(unit_rule, "UnitRule")
    for skus in json.loads(API_SKUS).values():
        for sku in skus:
            check(sku, "CustomSku")
    for rules in json.loads(API_RULES).values():
        for sku_rule in rules:
            check(sku_rule, "CustomSkuRule")


@pytest.mark.parametrize("archived_first", [False, True])
def test_live_sku_wins_over_an_archived_one_with_the_same_code(archived_first: bool) -> None:
    skus = json.loads(API_SKUS)
    skus["usd"][1]["code"] = "SLURM_GPU_HOUR"  # an old, archived SKU had the same code
    if archived_first:
        skus["usd"].reverse()
    catalog = api_catalog(skus=skus)
    assert not catalog.skus["SLURM_GPU_HOUR"].archived
    assert [r.rate for r in catalog.skus["SLURM_GPU_HOUR"].rules] == [2.5, 2]


def test_catalog_from_api_lists_every_problem() -> None:
    units = json.loads(API_UNITS)
    skus = json.loads(API_SKUS)
    rules = json.loads(API_RULES)
    units[1]["Rules"][0]["effectiveFrom"] = "2026-05-01T00:00:00Z"  # overlaps ur-1
    skus["core-hours"][0]["unitId"] = "u-404"  # a SKU pointing at a missing unit
    skus["usd"][1]["deletedAt"] = None  # now two live SKUs...
    skus["usd"][1]["code"] = "SLURM_GPU_HOUR"  # ...with the same code
    skus["gone"] = []  # a unit name not in the units list
    rules["s-2"][0]["rate"] = -1
    rules["s-2"][1]["customSkuId"] = "s-9"
    with pytest.raises(ConfigError) as caught:
        catalog_from_api(units, skus, rules, pulled_at=PULLED_AT)
    problems = caught.value.problems
    expected = [
        "unit 'usd': rules 1",
        "SKU 'SLURM_CPU_HOUR' points at unit id 'u-404'",
        "SKU code 'SLURM_GPU_HOUR' is used by two live SKUs",
        "unit 'gone', which is not in the units list",
        "SKU 'SLURM_GPU_HOUR' rule 1: rate -1 is negative",
        "belongs to customSkuId 's-9', not 's-2'",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda u, s, r: r.pop("s-2"),
            "SKU 'SLURM_GPU_HOUR' (id 's-2'): its rules were not fetched",
        ),
        (lambda u, s, r: u[1].update(Rules=None), "unit 'usd' is rated in USD but has no rules"),
        (lambda u, s, r: u[0].update(ratedInUsd="no"), "ratedInUsd must be a boolean"),
        (
            lambda u, s, r: s["usd"][0].update(unitId="u-1"),
            "listed under unit 'usd' but its unitId",
        ),
        (lambda u, s, r: s["usd"][0].pop("code"), "SKU id 's-2' of unit 'usd' has no code"),
        (lambda u, s, r: u.append(dict(u[0])), "unit 'core-hours' appears twice"),
    ],
)
def test_catalog_from_api_problems(change: Any, fragment: str) -> None:
    units, skus, rules = json.loads(API_UNITS), json.loads(API_SKUS), json.loads(API_RULES)
    change(units, skus, rules)
    with pytest.raises(ConfigError) as caught:
        catalog_from_api(units, skus, rules, pulled_at=PULLED_AT)
    assert any(fragment in p for p in caught.value.problems), caught.value.problems


def test_rules_may_be_keyed_by_sku_code() -> None:
    rules = json.loads(API_RULES)
    rules = {"SLURM_CPU_HOUR": rules["s-1"], "SLURM_GPU_HOUR": rules["s-2"], "s-3": rules["s-3"]}
    assert api_catalog(rules=rules) == api_catalog()
