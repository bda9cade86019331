"""The embedded rating engine: units, SKUs and effective-dated rate rules.

Pure: no network, no clock, no I/O. Reading, checking and writing catalogs (the catalog file, an
inline ``catalog:`` section, the API's shapes) is catalog I/O, in catalog.py, catalog_file.py and
catalog_api.py; their public names are RE-EXPORTED from this module on purpose (lazily, see its
end: they import this module), so ``from slurm_tracker.rating import load_catalog_file`` works.

It mirrors the Allocations platform: an event of ``quantity`` on a SKU costs
``amount = quantity x sku_rate`` units of the SKU's unit, and when that unit is rated in USD,
``usd = amount x unit_rate``. Both rates come from effective-dated rules: a rule covers
``[effectiveFrom, effectiveTo)`` (``effectiveTo`` null = open-ended). A SKU without any rule has
rate 1, as on the platform; a unit rated in USD must have rules. Gaps between rules are allowed
and raise :class:`RateMissing` when an event falls into one.

An event must lie inside ONE rate period: callers cut their segments at :func:`boundaries`
(and wherever else they like, e.g. month ends) before calling :func:`rate`, which takes the
rates in force at the event's start.

Rounding (the one rule): ``quantity x sku_rate`` and ``quantity x sku_rate x unit_rate`` are
computed exactly in Decimal (no float, no context rounding), then quantized once, at the end of
:func:`rate`, to 6 decimal places (``0.000001``) with ROUND_HALF_EVEN. ``usd`` is computed from
the exact amount, not from the rounded one. Totals are sums of the per-event rounded values, so
a total of n events is within n x 0.5e-6 of the exact total.

Rates are read as Decimal from their text, never through a binary float: the catalog file is
read with a YAML loader that builds Decimals from the number's text. Where a float has already
been made (an inline ``catalog:`` section loaded by plain YAML, JSON decoded into floats), it is
converted with ``Decimal(str(x))``, i.e. from its shortest repr (``2.5`` -> ``Decimal("2.5")``,
``0.1`` -> ``Decimal("0.1")``). Quoted rates (``rate: "0.04"``) are accepted too.
"""

from __future__ import annotations

import importlib
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import MAX_PREC, ROUND_HALF_EVEN, Context, Decimal
from typing import TYPE_CHECKING, Optional

from slurm_tracker.errors import TrackerError
from slurm_tracker.models import Rated

#: Version of the catalog data format written by :func:`dump_catalog`.
CATALOG_VERSION = 1

#: Rated amounts and USD values are quantized to this (ROUND_HALF_EVEN), once per event.
QUANTUM = Decimal("0.000001")


class RateMissing(TrackerError):
    """No rule of a SKU (or of its USD unit) covers the instant an event starts at."""

    def __init__(
        self, message: str, *, sku: str = "", unit: str = "", at: Optional[datetime] = None
    ) -> None:
        self.sku = sku
        self.unit = unit
        self.at = at
        super().__init__(message)


class UnknownSku(RateMissing):
    """The SKU code is not in the catalog at all."""


@dataclass(frozen=True)
class RateRule:
    """A rate in force over ``[effective_from_at, effective_to_at)``; None = open-ended."""

    effective_from_at: datetime
    effective_to_at: Optional[datetime]
    rate: Decimal

    def covers(self, at: datetime) -> bool:
        return self.effective_from_at <= at and (
            self.effective_to_at is None or at < self.effective_to_at
        )


@dataclass(frozen=True)
class Unit:
    """A billing unit; ``usd_rules`` give USD per unit when ``rated_in_usd``."""

    name: str
    rated_in_usd: bool
    usd_rules: tuple[RateRule, ...]


@dataclass(frozen=True)
class Sku:
    """A billable resource code; ``rules`` give units consumed per unit of quantity."""

    code: str
    unit: str  # the unit's name
    rules: tuple[RateRule, ...]
    archived: bool = False


@dataclass(frozen=True)
class Catalog:
    """Units by name and SKUs by code. ``source`` (for messages) takes no part in equality."""

    units: Mapping[str, Unit]
    skus: Mapping[str, Sku]
    version: int = CATALOG_VERSION
    pulled_at: Optional[datetime] = None
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class EffectiveRate:
    """One line of ``catalog show``: a SKU's rates in force at an instant, and its history.

    ``sku_rate`` is None when no SKU rule covers the instant; ``unit_rate`` is None when the
    unit is not rated in USD or no unit rule covers the instant (see ``rated_in_usd``).
    """

    sku: str
    unit: str
    rated_in_usd: bool
    archived: bool
    sku_rate: Optional[Decimal]
    unit_rate: Optional[Decimal]
    sku_rules: tuple[RateRule, ...]
    unit_rules: tuple[RateRule, ...]


# --------------------------------------------------------------------------- rating


def boundaries(catalog: Catalog, sku: str, start_at: datetime, end_at: datetime) -> list[datetime]:
    """Every rule boundary of the SKU, and of its unit when rated in USD, inside (start, end).

    Sorted and unique. The rules of a unit that is not rated in USD play no part in rating,
    so their boundaries are not returned.
    """
    _check_aware(start_at, "start_at")
    _check_aware(end_at, "end_at")
    instants = _instants(catalog, sku)
    return list(instants[bisect_right(instants, start_at) : bisect_left(instants, end_at)])


#: Per catalog (by identity, the catalog kept alive with it): per SKU, the sorted instants at
#: which one of its rules (or its USD unit's) starts or ends. Made once, read per event.
_INSTANTS: dict[int, tuple[Catalog, dict[str, tuple[datetime, ...]]]] = {}


def _instants(catalog: Catalog, sku: str) -> tuple[datetime, ...]:
    entry = _INSTANTS.get(id(catalog))
    if entry is None or entry[0] is not catalog:
        if len(_INSTANTS) >= 16:
            _INSTANTS.clear()
        entry = _INSTANTS[id(catalog)] = (catalog, {})
    found = entry[1].get(sku)
    if found is None:
        known = _sku(catalog, sku)
        rules = list(known.rules)
        unit = catalog.units.get(known.unit)
        if unit is not None and unit.rated_in_usd:
            rules.extend(unit.usd_rules)
        every = {r.effective_from_at for r in rules}
        every.update(r.effective_to_at for r in rules if r.effective_to_at is not None)
        found = entry[1][sku] = tuple(sorted(every))
    return found


def rate(
    catalog: Catalog, sku: str, quantity: Decimal, started_at: datetime, ended_at: datetime
) -> Rated:
    """What ``quantity`` of ``sku`` used over ``[started_at, ended_at)`` costs.

    The event must lie inside one rate period (ValueError otherwise: cut it at
    :func:`boundaries` first). Raises :class:`RateMissing` when no rule covers it and
    :class:`UnknownSku` (a RateMissing) when the SKU is not in the catalog.
    """
    _check_aware(started_at, "started_at")
    _check_aware(ended_at, "ended_at")
    if ended_at < started_at:
        raise ValueError(
            f"event of SKU {sku!r} ends ({_text(ended_at)}) before it starts ({_text(started_at)})"
        )
    if not quantity.is_finite():
        raise ValueError(f"event of SKU {sku!r} has a non-finite quantity {quantity}")
    found = _sku(catalog, sku)
    instants = _instants(catalog, sku)
    if bisect_right(instants, started_at) < bisect_left(instants, ended_at):
        inside = boundaries(catalog, sku, started_at, ended_at)
        raise ValueError(
            f"event of SKU {sku!r} from {_text(started_at)} to {_text(ended_at)} straddles rate "
            f"change(s) at {', '.join(_text(b) for b in inside)}: cut it at boundaries() first"
        )
    unit = catalog.units.get(found.unit)
    if unit is None:
        raise RateMissing(
            f"SKU {sku!r} belongs to unit {found.unit!r}, which is not in the catalog "
            f"{catalog.source or ''}: pull the catalog again",
            sku=sku,
            unit=found.unit,
            at=started_at,
        )
    sku_rate = _rate_at(found.rules, started_at, default=Decimal(1))
    if sku_rate is None:
        raise RateMissing(
            f"no rate for SKU {sku!r} at {_text(started_at)}: its rules cover "
            f"{_coverage(found.rules)}; add a rule covering that time to the catalog or pull it "
            "again",
            sku=sku,
            unit=unit.name,
            at=started_at,
        )
    amount = _exact_product(quantity, sku_rate)
    usd: Optional[Decimal] = None
    unit_rate: Optional[Decimal] = None
    if unit.rated_in_usd:
        unit_rate = _rate_at(unit.usd_rules, started_at, default=None)
        if unit_rate is None:
            raise RateMissing(
                f"no USD rate for unit {unit.name!r} (SKU {sku!r}) at {_text(started_at)}: its "
                f"rules cover {_coverage(unit.usd_rules)}; add a unit rule covering that time "
                "to the catalog or pull it again",
                sku=sku,
                unit=unit.name,
                at=started_at,
            )
        usd = _round(_exact_product(amount, unit_rate))
    return Rated(
        unit=unit.name,
        amount=_round(amount),
        usd=usd,
        sku_rate=sku_rate,
        unit_rate=unit_rate,
    )


def effective_rates(catalog: Catalog, at: datetime) -> list[EffectiveRate]:
    """Per SKU (sorted by code): its unit, the rates in force at ``at``, and the rule history."""
    _check_aware(at, "at")
    lines = []
    for code in sorted(catalog.skus):
        sku = catalog.skus[code]
        unit = catalog.units.get(sku.unit)
        rated_in_usd = unit is not None and unit.rated_in_usd
        unit_rules = unit.usd_rules if unit is not None else ()
        lines.append(
            EffectiveRate(
                sku=code,
                unit=sku.unit,
                rated_in_usd=rated_in_usd,
                archived=sku.archived,
                sku_rate=_rate_at(sku.rules, at, default=Decimal(1)),
                unit_rate=_rate_at(unit_rules, at, default=None) if rated_in_usd else None,
                sku_rules=_sorted_rules(sku.rules),
                unit_rules=_sorted_rules(unit_rules),
            )
        )
    return lines


def _sku(catalog: Catalog, code: str) -> Sku:
    found = catalog.skus.get(code)
    if found is None:
        known = sorted(catalog.skus)
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise UnknownSku(
            f"SKU {code!r} is not in the rating catalog {catalog.source}".rstrip()
            + f" (known: {shown or 'none'}): map the partition to a known SKU code, or pull the "
            "catalog again if the SKU is new",
            sku=code,
        )
    return found


def _rate_at(
    rules: Sequence[RateRule], at: datetime, *, default: Optional[Decimal]
) -> Optional[Decimal]:
    """The rate of the rule covering ``at``; ``default`` when there are no rules at all."""
    if not rules:
        return default
    for rule in rules:
        if rule.covers(at):
            return rule.rate
    return None


def _coverage(rules: Sequence[RateRule]) -> str:
    if not rules:
        return "nothing"
    return ", ".join(
        f"{_text(r.effective_from_at)} to {_text(r.effective_to_at)}" for r in _sorted_rules(rules)
    )


def _sorted_rules(rules: Sequence[RateRule]) -> tuple[RateRule, ...]:
    return tuple(sorted(rules, key=lambda r: r.effective_from_at))


#: A context that never rounds a product or a quantized value (Decimal's largest precision: a
#: product takes only as many digits as its factors have, so this costs nothing). One for all
#: calls, instead of one per call: only its flags change, and nothing reads them.
_EXACT = Context(prec=MAX_PREC)


def _exact_product(a: Decimal, b: Decimal) -> Decimal:
    """a x b with enough precision that nothing is rounded."""
    return _EXACT.multiply(a, b)


def _round(value: Decimal) -> Decimal:
    """The one rounding rule: 6 decimal places, ROUND_HALF_EVEN."""
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)


def _check_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} {value.isoformat()} has no timezone: pass a UTC datetime")


def _text(value: Optional[datetime]) -> str:
    """RFC 3339 in UTC with a Z; 'open' for None."""
    if value is None:
        return "open"
    text = value.astimezone(timezone.utc).isoformat()
    return text.replace("+00:00", "Z")


# --------------------------------------------------------------------------- catalog I/O
# Re-exported on purpose, lazily (PEP 562): the catalog modules import the types above, so an
# import at the top of this module would be circular.

_CATALOG_NAMES = {
    "catalog_from_data": "slurm_tracker.catalog",
    "load_catalog_file": "slurm_tracker.catalog_file",
    "dump_catalog": "slurm_tracker.catalog_file",
    "MAX_CATALOG_BYTES": "slurm_tracker.catalog_file",
    "catalog_from_api": "slurm_tracker.catalog_api",
}

if TYPE_CHECKING:  # the names as mypy sees them (`x as x`: an explicit re-export)
    from slurm_tracker.catalog import catalog_from_data as catalog_from_data  # noqa: PLC0414
    from slurm_tracker.catalog_api import catalog_from_api as catalog_from_api  # noqa: PLC0414
    from slurm_tracker.catalog_file import MAX_CATALOG_BYTES as MAX_CATALOG_BYTES  # noqa: PLC0414
    from slurm_tracker.catalog_file import dump_catalog as dump_catalog  # noqa: PLC0414
    from slurm_tracker.catalog_file import load_catalog_file as load_catalog_file  # noqa: PLC0414
else:

    def __getattr__(name: str) -> object:
        module = _CATALOG_NAMES.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)
