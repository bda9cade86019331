"""Checking catalog data: the rating catalog's units, SKUs and rules, every problem listed.

The data comes from the catalog file (catalog_file.py), from an inline ``catalog:`` section of
the configuration, or from the Allocations API (catalog_api.py); the engine that rates with the
result is rating.py, which re-exports :func:`catalog_from_data` (and the other modules' public
names) so that ``from slurm_tracker.rating import catalog_from_data`` keeps working.

Rates are read as Decimal, never through a binary float: a float already made (an inline
section loaded by plain YAML, JSON decoded into floats) is converted from its shortest repr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Optional

from dateutil.parser import isoparse

from slurm_tracker.errors import ConfigError
from slurm_tracker.rating import CATALOG_VERSION, Catalog, RateRule, Sku, Unit, _text

TOP_KEYS = ("version", "pulled_at", "units")
_UNIT_KEYS = ("name", "ratedInUsd", "rules", "skus")
_SKU_KEYS = ("code", "archived", "rules")
_RULE_KEYS = ("effectiveFrom", "effectiveTo", "rate")


class Problems:
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
    problems = Problems(source)
    catalog = validated_catalog(data, problems, source, require_version=require_version)
    if problems.items or catalog is None:
        raise ConfigError(source, problems.items or ["the catalog is empty"])
    return catalog


def validated_catalog(
    data: object, problems: Problems, source: str, *, require_version: bool
) -> Optional[Catalog]:
    if not isinstance(data, Mapping):
        problems.add(
            data,
            f"the catalog must be a mapping with keys {', '.join(TOP_KEYS)}, not {type_text(data)}",
        )
        return None
    _unknown_keys(data, TOP_KEYS, "the catalog", problems)
    version = CATALOG_VERSION
    if "version" in data:
        raw = data["version"]
        if not isinstance(raw, int) or isinstance(raw, bool):
            problems.add(data, f"version must be an integer, not {type_text(raw)}")
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
        problems.add(data, f"units must be a list, not {type_text(raw_units)}")
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
    problems: Problems,
) -> None:
    what = f"units[{index}]"
    if not isinstance(raw, Mapping):
        problems.add(raw, f"{what} must be a mapping with keys {', '.join(_UNIT_KEYS)}")
        return
    name = raw.get("name")
    if isinstance(name, str) and name.strip():
        what = f"unit {name!r}"
    else:
        problems.add(raw, f"{what}: name must be a non-empty string, not {type_text(name)}")
        name = None
    _unknown_keys(raw, _UNIT_KEYS, what, problems)
    rated_in_usd = raw.get("ratedInUsd")
    if not isinstance(rated_in_usd, bool):
        problems.add(
            raw, f"{what}: ratedInUsd must be true or false, not {type_text(rated_in_usd)}"
        )
        rated_in_usd = False
    rules = checked_rules(raw.get("rules"), what, raw, problems, strict_keys=True)
    if rated_in_usd and not rules and not had_rule_items(raw.get("rules")):
        problems.add(
            raw,
            f"{what} is rated in USD but has no rules: add rules giving its USD rate "
            "per unit, or set ratedInUsd: false",
        )
    raw_skus = raw.get("skus", [])
    if raw_skus is None:
        raw_skus = []
    if not isinstance(raw_skus, list):
        problems.add(raw, f"{what}: skus must be a list, not {type_text(raw_skus)}")
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


def had_rule_items(raw: object) -> bool:
    """Whether a rules list had entries (all of them invalid, already reported)."""
    return isinstance(raw, list) and bool(raw)


def _sku_data(raw: object, what: str, unit: str, problems: Problems) -> Optional[Sku]:
    if not isinstance(raw, Mapping):
        problems.add(raw, f"{what} must be a mapping with keys {', '.join(_SKU_KEYS)}")
        return None
    code = raw.get("code")
    if isinstance(code, str) and code.strip():
        what = f"SKU {code!r}"
    else:
        problems.add(raw, f"{what}: code must be a non-empty string, not {type_text(code)}")
        code = None
    _unknown_keys(raw, _SKU_KEYS, what, problems)
    archived = raw.get("archived", False)
    if not isinstance(archived, bool):
        problems.add(raw, f"{what}: archived must be true or false, not {type_text(archived)}")
        archived = False
    rules = checked_rules(raw.get("rules"), what, raw, problems, strict_keys=True)
    if code is None:
        return None
    return Sku(code=code, unit=unit, rules=rules, archived=archived)


def checked_rules(
    raw: object, what: str, owner: object, problems: Problems, *, strict_keys: bool
) -> tuple[RateRule, ...]:
    """Parse and check a list of rules: types, effectiveTo > effectiveFrom, rate >= 0, overlaps."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(owner, f"{what}: rules must be a list, not {type_text(raw)}")
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
    raw: object, what: str, owner: object, problems: Problems, *, strict_keys: bool
) -> tuple[Optional[RateRule], bool]:
    """The rule (when its dates are valid, so overlaps can be checked) and whether it is valid."""
    if not isinstance(raw, Mapping):
        problems.add(
            owner,
            f"{what} must be a mapping like {{effectiveFrom: ..., effectiveTo: ..., rate: ...}}, "
            f"not {type_text(raw)}",
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


def _instant(value: object, what: str, node: object, problems: Problems) -> Optional[datetime]:
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
        problems.add(node, f"{what} must be an RFC 3339 timestamp, not {type_text(value)}")
        return None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        problems.add(node, f"{what} {value!s} has no UTC offset: add one, e.g. 'Z' for UTC")
        return None
    return parsed.astimezone(timezone.utc)


def _decimal(value: object, what: str, node: object, problems: Problems) -> Optional[Decimal]:
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
    problems: Problems,
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


def _where(node: object, problems: Problems, fallback: str) -> str:
    line = getattr(node, "line", None)
    return f"at {problems.source}:{line}" if line else fallback


def type_text(value: object) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"
