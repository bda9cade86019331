"""The catalog pulled from the Allocations API: its JSON shapes turned into a checked Catalog."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Optional

from dateutil.parser import isoparse

from slurm_tracker.catalog import Problems, checked_rules, had_rule_items, type_text
from slurm_tracker.errors import ConfigError
from slurm_tracker.rating import (
    CATALOG_VERSION,
    Catalog,
    RateRule,
    Sku,
    Unit,
    _check_aware,
    _sorted_rules,
)

_API_SOURCE = "Allocations API catalog"


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
    problems = Problems(_API_SOURCE)
    unit_by_id: dict[str, str] = {}
    catalog_units: dict[str, Unit] = {}
    for index, raw in enumerate(units, start=1):
        what = f"unit {index}"
        if not isinstance(raw, Mapping):
            problems.add(None, f"{what} is not a JSON object but {type_text(raw)}")
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
            problems.add(
                None, f"{what}: ratedInUsd must be a boolean, not {type_text(rated_in_usd)}"
            )
            rated_in_usd = False
        raw_rules = raw.get("Rules", raw.get("rules"))
        rules = _api_rules(raw_rules, what, "unitId", unit_id, problems)
        if rated_in_usd and not rules and not had_rule_items(raw_rules):
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
    raw: object, listed_under: str, unit_by_id: Mapping[str, str], problems: Problems
) -> Optional[str]:
    """The name of the unit a CustomSku belongs to (by its unitId), or None after a problem."""
    if not isinstance(raw, Mapping):
        problems.add(None, f"a SKU of unit {listed_under!r} is not a JSON object: {type_text(raw)}")
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
        problems.add(None, f"SKU {code!r}: deletedAt must be a timestamp, not {type_text(deleted)}")
        return None
    return name


def _later(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """Whether archived SKU ``a`` was deleted after ``b`` (RFC 3339 texts, compared parsed)."""
    try:
        return isoparse(str(a.get("deletedAt"))) > isoparse(str(b.get("deletedAt")))
    except (ValueError, TypeError, OverflowError):
        return False


def _api_rules(
    raw: object, what: str, parent_key: str, parent_id: object, problems: Problems
) -> tuple[RateRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        problems.add(None, f"{what}: rules must be a JSON array, not {type_text(raw)}")
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
    rules = checked_rules(items, what, None, problems, strict_keys=False)
    return _sorted_rules(rules)
