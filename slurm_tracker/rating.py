"""The embedded rating engine: units, SKUs and effective-dated rate rules.

Pure: no network, no clock; the only I/O is reading a catalog file.

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

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Optional

import yaml
from dateutil.parser import isoparse
from yaml.constructor import ConstructorError

from slurm_tracker.config import GuardedLoader, YamlRefused, describe_yaml_error, shown_value
from slurm_tracker.errors import ConfigError, TrackerError, UnsafeFile
from slurm_tracker.files import read_trusted
from slurm_tracker.models import Rated

logger = logging.getLogger(__name__)

#: Version of the catalog data format written by :func:`dump_catalog`.
CATALOG_VERSION = 1

#: Rated amounts and USD values are quantized to this (ROUND_HALF_EVEN), once per event.
QUANTUM = Decimal("0.000001")

_TOP_KEYS = ("version", "pulled_at", "units")
_UNIT_KEYS = ("name", "ratedInUsd", "rules", "skus")
_SKU_KEYS = ("code", "archived", "rules")
_RULE_KEYS = ("effectiveFrom", "effectiveTo", "rate")
_API_SOURCE = "Allocations API catalog"


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
    found = _sku(catalog, sku)
    rules = list(found.rules)
    unit = catalog.units.get(found.unit)
    if unit is not None and unit.rated_in_usd:
        rules.extend(unit.usd_rules)
    instants = set()
    for rule in rules:
        for instant in (rule.effective_from_at, rule.effective_to_at):
            if instant is not None and start_at < instant < end_at:
                instants.add(instant)
    return sorted(instants)


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
    inside = boundaries(catalog, sku, started_at, ended_at)
    if inside:
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


def _exact_product(a: Decimal, b: Decimal) -> Decimal:
    """a x b with enough precision that nothing is rounded."""
    digits = len(a.as_tuple().digits) + len(b.as_tuple().digits)
    return Context(prec=max(28, digits)).multiply(a, b)


def _round(value: Decimal) -> Decimal:
    """The one rounding rule: 6 decimal places, ROUND_HALF_EVEN."""
    context = Context(prec=max(28, value.adjusted() + 10))
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=context)


def _check_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} {value.isoformat()} has no timezone: pass a UTC datetime")


def _text(value: Optional[datetime]) -> str:
    """RFC 3339 in UTC with a Z; 'open' for None."""
    if value is None:
        return "open"
    text = value.astimezone(timezone.utc).isoformat()
    return text.replace("+00:00", "Z")


# --------------------------------------------------------------------------- validation


class _Problems:
    """Collects problems, each prefixed with where it is (``source:line`` when known)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, node: object, message: str) -> None:
        line = getattr(node, "line", None)
        prefix = f"{self.source}:{line}: " if line else ""
        self.items.append(prefix + message)


def catalog_from_data(
    data: Mapping[str, object], source: str, *, require_version: bool = False
) -> Catalog:
    """Validate catalog data (the YAML file or an inline ``catalog:`` section).

    Raises ConfigError(source, problems) listing every problem found.
    """
    problems = _Problems(source)
    catalog = _catalog(data, problems, source, require_version=require_version)
    if problems.items or catalog is None:
        raise ConfigError(source, problems.items or ["the catalog is empty"])
    return catalog


def _catalog(
    data: object, problems: _Problems, source: str, *, require_version: bool
) -> Optional[Catalog]:
    if not isinstance(data, Mapping):
        problems.add(
            data,
            f"the catalog must be a mapping with keys {', '.join(_TOP_KEYS)}, not {_type(data)}",
        )
        return None
    _unknown_keys(data, _TOP_KEYS, "the catalog", problems)
    version = CATALOG_VERSION
    if "version" in data:
        raw = data["version"]
        if not isinstance(raw, int) or isinstance(raw, bool):
            problems.add(data, f"version must be an integer, not {_type(raw)}")
        elif raw > CATALOG_VERSION or raw < 1:
            problems.add(
                data,
                f"catalog version {raw} is not understood by this slurm-tracker (it reads "
                f"version {CATALOG_VERSION}): upgrade slurm-tracker or pull the catalog again",
            )
        else:
            version = raw
    elif require_version:
        problems.add(data, f"version is missing: add 'version: {CATALOG_VERSION}' at the top")
    pulled_at = None
    if data.get("pulled_at") is not None:
        pulled_at = _instant(data["pulled_at"], "pulled_at", data, problems)
    raw_units = data.get("units")
    if raw_units is None:
        problems.add(data, "units is missing: list the units and their SKUs under 'units:'")
        raw_units = []
    elif not isinstance(raw_units, list):
        problems.add(data, f"units must be a list, not {_type(raw_units)}")
        raw_units = []
    units: dict[str, Unit] = {}
    skus: dict[str, Sku] = {}
    unit_where: dict[str, str] = {}
    sku_where: dict[str, str] = {}
    for index, raw_unit in enumerate(raw_units, start=1):
        _unit(
            raw_unit,
            index,
            units=units,
            skus=skus,
            unit_where=unit_where,
            sku_where=sku_where,
            problems=problems,
        )
    return Catalog(units=units, skus=skus, version=version, pulled_at=pulled_at, source=source)


def _unit(
    raw: object,
    index: int,
    *,
    units: dict[str, Unit],
    skus: dict[str, Sku],
    unit_where: dict[str, str],
    sku_where: dict[str, str],
    problems: _Problems,
) -> None:
    what = f"units[{index}]"
    if not isinstance(raw, Mapping):
        problems.add(raw, f"{what} must be a mapping with keys {', '.join(_UNIT_KEYS)}")
        return
    name = raw.get("name")
    if isinstance(name, str) and name.strip():
        what = f"unit {name!r}"
    else:
        problems.add(raw, f"{what}: name must be a non-empty string, not {_type(name)}")
        name = None
    _unknown_keys(raw, _UNIT_KEYS, what, problems)
    rated_in_usd = raw.get("ratedInUsd")
    if not isinstance(rated_in_usd, bool):
        problems.add(raw, f"{what}: ratedInUsd must be true or false, not {_type(rated_in_usd)}")
        rated_in_usd = False
    rules = _rules(raw.get("rules"), what, raw, problems, strict_keys=True)
    if rated_in_usd and not rules and not _had_rule_items(raw.get("rules")):
        problems.add(
            raw,
            f"{what} is rated in USD but has no rules: add rules giving its USD rate "
            "per unit, or set ratedInUsd: false",
        )
    raw_skus = raw.get("skus", [])
    if raw_skus is None:
        raw_skus = []
    if not isinstance(raw_skus, list):
        problems.add(raw, f"{what}: skus must be a list, not {_type(raw_skus)}")
        raw_skus = []
    if name is not None:
        where = _where(raw, problems, what)
        if name in units:
            problems.add(raw, f"unit {name!r} appears twice (first {unit_where[name]}): merge them")
        else:
            units[name] = Unit(name=name, rated_in_usd=rated_in_usd, usd_rules=rules)
            unit_where[name] = where
    for sku_index, raw_sku in enumerate(raw_skus, start=1):
        sku = _sku_data(raw_sku, f"{what} skus[{sku_index}]", name or "", problems)
        if sku is None or name is None:
            continue
        where = _where(raw_sku, problems, f"under {what}")
        if sku.code in skus:
            problems.add(
                raw_sku,
                f"SKU {sku.code!r} appears twice (first {sku_where[sku.code]}): a SKU code "
                "must be unique in the catalog",
            )
        else:
            skus[sku.code] = sku
            sku_where[sku.code] = where


def _had_rule_items(raw: object) -> bool:
    """Whether a rules list had entries (all of them invalid, already reported)."""
    return isinstance(raw, list) and bool(raw)


def _sku_data(raw: object, what: str, unit: str, problems: _Problems) -> Optional[Sku]:
    if not isinstance(raw, Mapping):
        problems.add(raw, f"{what} must be a mapping with keys {', '.join(_SKU_KEYS)}")
        return None
    code = raw.get("code")
    if isinstance(code, str) and code.strip():
        what = f"SKU {code!r}"
    else:
        problems.add(raw, f"{what}: code must be a non-empty string, not {_type(code)}")
        code = None
    _unknown_keys(raw, _SKU_KEYS, what, problems)
    archived = raw.get("archived", False)
    if not isinstance(archived, bool):
        problems.add(raw, f"{what}: archived must be true or false, not {_type(archived)}")
        archived = False
    rules = _rules(raw.get("rules"), what, raw, problems, strict_keys=True)
    if code is None:
        return None
    return Sku(code=code, unit=unit, rules=rules, archived=archived)


def _rules(
    raw: object, what: str, owner: object, problems: _Problems, *, strict_keys: bool
) -> tuple[RateRule, ...]:
    """Parse and check a list of rules: types, effectiveTo > effectiveFrom, rate >= 0, overlaps."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(owner, f"{what}: rules must be a list, not {_type(raw)}")
        return ()
    parsed: list[tuple[int, RateRule, object]] = []  # rules with valid dates, even if bad
    bad = False
    for index, item in enumerate(raw, start=1):
        rule, ok = _rule(item, f"{what} rule {index}", owner, problems, strict_keys=strict_keys)
        bad = bad or not ok
        if rule is not None:
            parsed.append((index, rule, item if getattr(item, "line", None) else owner))
    for i, (index_a, a, _) in enumerate(parsed):
        for index_b, b, node_b in parsed[i + 1 :]:
            if _overlap(a, b):
                first, second = (a, b) if a.effective_from_at <= b.effective_from_at else (b, a)
                problems.add(
                    node_b,
                    f"{what}: rules {index_a} ({_span(a)}) and {index_b} ({_span(b)}) overlap: "
                    f"end the rule starting {_text(first.effective_from_at)} at or before "
                    f"{_text(second.effective_from_at)}",
                )
    if bad:
        return ()
    return tuple(rule for _, rule, _ in parsed)


def _rule(
    raw: object, what: str, owner: object, problems: _Problems, *, strict_keys: bool
) -> tuple[Optional[RateRule], bool]:
    """The rule (when its dates are valid, so overlaps can be checked) and whether it is valid."""
    if not isinstance(raw, Mapping):
        problems.add(
            owner,
            f"{what} must be a mapping like {{effectiveFrom: ..., effectiveTo: ..., rate: ...}}, "
            f"not {_type(raw)}",
        )
        return None, False
    if strict_keys:
        _unknown_keys(raw, _RULE_KEYS, what, problems, owner)
    node = raw if getattr(raw, "line", None) else owner
    ok = True
    start = None
    if "effectiveFrom" not in raw or raw["effectiveFrom"] is None:
        problems.add(node, f"{what}: effectiveFrom is missing: give the instant it starts at")
        ok = False
    else:
        start = _instant(raw["effectiveFrom"], f"{what}: effectiveFrom", node, problems)
        ok = ok and start is not None
    end = None
    if raw.get("effectiveTo") is not None:
        end = _instant(raw["effectiveTo"], f"{what}: effectiveTo", node, problems)
        ok = ok and end is not None
    dates_ok = ok
    value = None
    if "rate" not in raw or raw["rate"] is None:
        problems.add(node, f"{what}: rate is missing")
        ok = False
    else:
        value = _decimal(raw["rate"], f"{what}: rate", node, problems)
        ok = ok and value is not None
    if start is not None and end is not None and end <= start:
        problems.add(
            node,
            f"{what}: effectiveTo {_text(end)} is not after effectiveFrom {_text(start)}: "
            "fix the dates or remove the rule",
        )
        ok = dates_ok = False
    if not dates_ok or start is None:
        return None, False
    rule = RateRule(effective_from_at=start, effective_to_at=end, rate=value or Decimal(0))
    return rule, ok


def _overlap(a: RateRule, b: RateRule) -> bool:
    a_before_b_ends = b.effective_to_at is None or a.effective_from_at < b.effective_to_at
    b_before_a_ends = a.effective_to_at is None or b.effective_from_at < a.effective_to_at
    return a_before_b_ends and b_before_a_ends


def _span(rule: RateRule) -> str:
    return f"{_text(rule.effective_from_at)} to {_text(rule.effective_to_at)}"


def _instant(value: object, what: str, node: object, problems: _Problems) -> Optional[datetime]:
    """An RFC 3339 timestamp with an offset (text, or a datetime YAML already made), in UTC."""
    parsed: Optional[datetime] = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = isoparse(value.strip())
        except (ValueError, OverflowError):
            problems.add(
                node, f"{what} {value!r} is not an RFC 3339 timestamp like 2026-01-01T00:00:00Z"
            )
            return None
    elif isinstance(value, date):
        problems.add(
            node, f"{what} {value} is a date: give a time and offset, e.g. {value}T00:00:00Z"
        )
        return None
    else:
        problems.add(node, f"{what} must be an RFC 3339 timestamp, not {_type(value)}")
        return None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        problems.add(node, f"{what} {value!s} has no UTC offset: add one, e.g. 'Z' for UTC")
        return None
    return parsed.astimezone(timezone.utc)


def _decimal(value: object, what: str, node: object, problems: _Problems) -> Optional[Decimal]:
    """A finite, non-negative Decimal from an int, a Decimal, decimal text, or a float's repr."""
    number: Optional[Decimal] = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(str(value))  # the float's shortest repr, never its binary expansion
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            number = None
    if number is None or not number.is_finite():
        problems.add(node, f"{what} must be a finite number, not {value!r}")
        return None
    if number < 0:
        problems.add(node, f"{what} {number} is negative: rates must be 0 or more")
        return None
    return number


def _unknown_keys(
    raw: Mapping[object, object],
    allowed: Sequence[str],
    what: str,
    problems: _Problems,
    node: object = None,
) -> None:
    unknown = [key for key in raw if key not in allowed]
    if unknown:
        where = raw if getattr(raw, "line", None) or node is None else node
        problems.add(
            where,
            f"{what}: unknown key(s) {', '.join(repr(k) for k in unknown)} "
            f"(allowed: {', '.join(allowed)}): check the spelling",
        )


def _where(node: object, problems: _Problems, fallback: str) -> str:
    line = getattr(node, "line", None)
    return f"at {problems.source}:{line}" if line else fallback


def _type(value: object) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------- the YAML file


class _LineDict(dict[object, object]):
    """A YAML mapping that remembers the line it started on (1-based)."""

    line: int = 0


class _CatalogLoader(GuardedLoader):
    """Safe YAML (hardened as the configuration's: depth, aliases, values that cannot be built),
    with numbers with a fraction read as Decimal from their text, timestamps left as text
    (parsed and checked by the validator), mappings that know their line, and duplicate keys
    reported instead of silently overwritten."""

    duplicate_keys: list[tuple[int, str]]


_CatalogLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


#: Numbers in a catalog file beyond 10^±this are refused: rating them would need as many digits.
_MAX_EXPONENT = 1000


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        # .inf, .nan and base-60 floats: let the validator refuse what is not a finite rate
        return loader.construct_yaml_float(node)
    if number.is_finite() and number and abs(number.adjusted()) > _MAX_EXPONENT:
        raise ConstructorError(
            None,
            None,
            f"the number {shown_value(text)} is out of range (beyond 10^±{_MAX_EXPONENT})",
            node.start_mark,
        )
    return number


def _construct_mapping(loader: _CatalogLoader, node: yaml.MappingNode) -> Iterator[object]:
    data = _LineDict()
    data.line = node.start_mark.line + 1
    yield data
    seen: set[object] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                loader.duplicate_keys.append((key_node.start_mark.line + 1, key_node.value))
            seen.add(key_node.value)
    data.update(loader.construct_mapping(node))


_CatalogLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)
_CatalogLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


#: The largest catalog file read.
MAX_CATALOG_BYTES = 64 << 20


def load_catalog_file(path: Path) -> Catalog:
    """Read a catalog YAML file (as written by :func:`dump_catalog`). ConfigError on problems.

    The file must be trusted (see :func:`slurm_tracker.files.read_trusted`): a symbolic link,
    a file another user owns or can write, or one in a directory others can write is an
    UnsafeFile.
    """
    source = str(path)
    try:
        text = read_trusted(path, "catalog file", limit=MAX_CATALOG_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            source, [f"cannot read the catalog file: {exc}; check catalog_file in the config"]
        ) from exc
    except UnsafeFile as exc:
        if os.path.lexists(path):
            raise
        raise ConfigError(  # its directory is missing: say what matters
            source, [f"cannot read the catalog file: {path} does not exist; check catalog_file"]
        ) from exc
    loader = _CatalogLoader(text)
    loader.duplicate_keys = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        line, column, what = describe_yaml_error(exc)
        where = f"{source}:{line}: " if line else f"{source}: "
        if isinstance(exc, (YamlRefused, ConstructorError)):
            raise ConfigError(source, [f"{where}cannot be read: {what}"]) from exc
        raise ConfigError(source, [f"{where}not valid YAML: {what} (column {column})"]) from exc
    except RecursionError as exc:  # the depth limit makes this unreachable; kept as a backstop
        raise ConfigError(source, [f"{source}: cannot be read: nested too deeply"]) from exc
    finally:
        loader.dispose()
    problems = _Problems(source)
    for line, key in loader.duplicate_keys:
        problems.items.append(
            f"{source}:{line}: key {shown_value(str(key))!r} appears twice in one mapping"
        )
    if data is None:
        problems.items.append(f"{source}: the file is empty: write it with `catalog pull`")
        raise ConfigError(source, problems.items)
    if not isinstance(data, Mapping):
        # Whatever this file is (an API key, another YAML file), its content is not shown.
        problems.items.append(
            f"{source}: not a slurm-tracker catalog (its top level is not a mapping with keys "
            f"{', '.join(_TOP_KEYS)}): check catalog_file, or write it with `catalog pull`"
        )
        raise ConfigError(source, problems.items)
    catalog = _catalog(data, problems, source, require_version=True)
    if problems.items or catalog is None:
        raise ConfigError(source, problems.items)
    logger.debug(
        "read catalog %s: %d units, %d SKUs", source, len(catalog.units), len(catalog.skus)
    )
    return catalog


def dump_catalog(catalog: Catalog) -> str:
    """The catalog as human-readable YAML in the catalog file format (version 1).

    ``load_catalog_file`` of the result gives an equal catalog (rule order kept, rates exact).
    """
    lines = [
        "# slurm-tracker rating catalog. A rule covers [effectiveFrom, effectiveTo);",
        "# effectiveTo null = open-ended. SKU rate = units per unit of quantity; unit rate =",
        "# USD per unit (units rated in USD only). A SKU without rules has rate 1.",
        f"version: {CATALOG_VERSION}",
    ]
    if catalog.pulled_at is not None:
        lines.append(f'pulled_at: "{_text(catalog.pulled_at)}"')
    by_unit: dict[str, list[Sku]] = {name: [] for name in catalog.units}
    for sku in catalog.skus.values():
        if sku.unit not in by_unit:
            raise ValueError(f"SKU {sku.code!r} belongs to unit {sku.unit!r}, not in the catalog")
        by_unit[sku.unit].append(sku)
    lines.append("units:" if catalog.units else "units: []")
    for unit in catalog.units.values():
        lines.append(f"  - name: {_quoted(unit.name)}")
        lines.append(f"    ratedInUsd: {'true' if unit.rated_in_usd else 'false'}")
        lines.extend(_dump_rules(unit.usd_rules, "    "))
        skus = by_unit[unit.name]
        lines.append("    skus:" if skus else "    skus: []")
        for sku in skus:
            lines.append(f"      - code: {_quoted(sku.code)}")
            if sku.archived:
                lines.append("        archived: true")
            lines.extend(_dump_rules(sku.rules, "        "))
    return "\n".join(lines) + "\n"


def _dump_rules(rules: Sequence[RateRule], indent: str) -> list[str]:
    if not rules:
        return [f"{indent}rules: []"]
    lines = [f"{indent}rules:"]
    for rule in rules:
        end = "null" if rule.effective_to_at is None else f'"{_text(rule.effective_to_at)}"'
        lines.append(
            f'{indent}  - {{effectiveFrom: "{_text(rule.effective_from_at)}", '
            f"effectiveTo: {end}, rate: {_number(rule.rate)}}}"
        )
    return lines


def _number(value: Decimal) -> str:
    """Plain decimal text (no exponent), which the loader reads back as the same Decimal."""
    return format(value, "f")


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- the API


def catalog_from_api(
    units: Sequence[Mapping[str, object]],
    skus_by_unit: Mapping[str, Sequence[Mapping[str, object]]],
    rules_by_sku: Mapping[str, Sequence[Mapping[str, object]]],
    *,
    pulled_at: datetime,
) -> Catalog:
    """Build a catalog from the Allocations API's JSON.

    ``units``: the ``GET .../units`` list (``Unit``: id, name, ratedInUsd, ``Rules``).
    ``skus_by_unit``: unit NAME -> the ``GET .../units/{name}/skus?includeArchived=true`` list
    (``CustomSku``: id, code, unitId, deletedAt). ``rules_by_sku``: SKU ID (as in the rules URL;
    the SKU code is accepted too) -> the ``GET .../skus/{id}/rules`` list (``CustomSkuRule``).
    Every SKU must have an entry in ``rules_by_sku`` (an empty list when it has no rules), so that
    a missed request is not mistaken for "rate 1". SKUs with ``deletedAt`` are archived; when a
    code is both live and archived, the live SKU wins. Other fields are ignored. Rules are
    sorted by effectiveFrom. Raises ConfigError listing every problem.
    """
    _check_aware(pulled_at, "pulled_at")
    problems = _Problems(_API_SOURCE)
    unit_by_id: dict[str, str] = {}
    catalog_units: dict[str, Unit] = {}
    for index, raw in enumerate(units, start=1):
        what = f"unit {index}"
        if not isinstance(raw, Mapping):
            problems.add(None, f"{what} is not a JSON object but {_type(raw)}")
            continue
        name, unit_id = raw.get("name"), raw.get("id")
        if not isinstance(name, str) or not name:
            problems.add(None, f"{what} (id {unit_id!r}) has no name")
            continue
        what = f"unit {name!r}"
        if not isinstance(unit_id, str) or not unit_id:
            problems.add(None, f"{what} has no id")
        rated_in_usd = raw.get("ratedInUsd")
        if not isinstance(rated_in_usd, bool):
            problems.add(None, f"{what}: ratedInUsd must be a boolean, not {_type(rated_in_usd)}")
            rated_in_usd = False
        raw_rules = raw.get("Rules", raw.get("rules"))
        rules = _api_rules(raw_rules, what, "unitId", unit_id, problems)
        if rated_in_usd and not rules and not _had_rule_items(raw_rules):
            problems.add(
                None,
                f"{what} is rated in USD but has no rules: add a unit rule on the platform",
            )
        if name in catalog_units:
            problems.add(None, f"unit {name!r} appears twice in the units list")
            continue
        catalog_units[name] = Unit(name=name, rated_in_usd=rated_in_usd, usd_rules=rules)
        if isinstance(unit_id, str) and unit_id:
            unit_by_id[unit_id] = name
    for listed_under in skus_by_unit:
        if listed_under not in catalog_units:
            problems.add(
                None, f"SKUs were listed for unit {listed_under!r}, which is not in the units list"
            )
    chosen: dict[str, tuple[Mapping[str, object], str]] = {}
    for listed_under, raw_skus in skus_by_unit.items():
        for raw in raw_skus:
            picked = _api_sku_unit(raw, listed_under, unit_by_id, problems)
            if picked is None:
                continue
            code = str(raw["code"])
            previous = chosen.get(code)
            if previous is None:
                chosen[code] = (raw, picked)
                continue
            live_old = previous[0].get("deletedAt") is None
            live_new = raw.get("deletedAt") is None
            if live_old and live_new:
                problems.add(
                    None,
                    f"SKU code {code!r} is used by two live SKUs ({previous[0].get('id')!r} and "
                    f"{raw.get('id')!r}): archive one of them on the platform",
                )
            elif live_new or (not live_old and _later(raw, previous[0])):
                chosen[code] = (raw, picked)
    skus: dict[str, Sku] = {}
    for code, (raw, unit_name) in chosen.items():
        sku_id = raw.get("id")
        key = sku_id if isinstance(sku_id, str) and sku_id in rules_by_sku else code
        if key not in rules_by_sku:
            problems.add(
                None,
                f"SKU {code!r} (id {sku_id!r}): its rules were not fetched; fetch "
                f".../units/{unit_name}/skus/{sku_id}/rules (an empty list if it has none)",
            )
            continue
        rules = _api_rules(rules_by_sku[key], f"SKU {code!r}", "customSkuId", sku_id, problems)
        skus[code] = Sku(
            code=code, unit=unit_name, rules=rules, archived=raw.get("deletedAt") is not None
        )
    if problems.items:
        raise ConfigError(_API_SOURCE, problems.items)
    return Catalog(
        units=catalog_units,
        skus=dict(sorted(skus.items())),
        version=CATALOG_VERSION,
        pulled_at=pulled_at.astimezone(timezone.utc),
        source=_API_SOURCE,
    )


def _api_sku_unit(
    raw: object, listed_under: str, unit_by_id: Mapping[str, str], problems: _Problems
) -> Optional[str]:
    """The name of the unit a CustomSku belongs to (by its unitId), or None after a problem."""
    if not isinstance(raw, Mapping):
        problems.add(None, f"a SKU of unit {listed_under!r} is not a JSON object: {_type(raw)}")
        return None
    code = raw.get("code")
    if not isinstance(code, str) or not code:
        problems.add(None, f"SKU id {raw.get('id')!r} of unit {listed_under!r} has no code")
        return None
    unit_id = raw.get("unitId")
    name = unit_by_id.get(unit_id) if isinstance(unit_id, str) else None
    if name is None:
        problems.add(
            None,
            f"SKU {code!r} points at unit id {unit_id!r}, which is not in the units list: "
            "pull the catalog again",
        )
        return None
    if name != listed_under:
        problems.add(
            None,
            f"SKU {code!r} was listed under unit {listed_under!r} but its unitId is unit "
            f"{name!r}'s",
        )
        return None
    deleted = raw.get("deletedAt")
    if deleted is not None and not isinstance(deleted, str):
        problems.add(None, f"SKU {code!r}: deletedAt must be a timestamp, not {_type(deleted)}")
        return None
    return name


def _later(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Whether archived SKU ``a`` was deleted after ``b`` (RFC 3339 texts, compared parsed)."""
    try:
        return isoparse(str(a.get("deletedAt"))) > isoparse(str(b.get("deletedAt")))
    except (ValueError, TypeError, OverflowError):
        return False


def _api_rules(
    raw: object, what: str, parent_key: str, parent_id: object, problems: _Problems
) -> tuple[RateRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        problems.add(None, f"{what}: rules must be a JSON array, not {_type(raw)}")
        return ()
    items = list(raw)
    for index, item in enumerate(items, start=1):
        if isinstance(item, Mapping):
            parent = item.get(parent_key)
            if parent is not None and parent_id is not None and parent != parent_id:
                problems.add(
                    None,
                    f"{what} rule {index} (id {item.get('id')!r}) belongs to {parent_key} "
                    f"{parent!r}, not {parent_id!r}",
                )
    rules = _rules(items, what, None, problems, strict_keys=False)
    return _sorted_rules(rules)
