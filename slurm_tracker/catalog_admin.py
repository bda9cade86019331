"""Catalog administration: the catalog a config names, and how the config's mappings compare
with it and with the API (`check`, `catalog pull`, `catalog show`).

Moved out of pipeline.py, which re-exports these names for the CLI and the other importers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from slurm_tracker import api, rating
from slurm_tracker.config import Config
from slurm_tracker.errors import ApiError


def load_catalog(config: Config) -> Optional[rating.Catalog]:
    """The catalog named by the config (a file, else the inline section), if any."""
    if config.catalog_file is not None:
        return rating.load_catalog_file(config.catalog_file)
    if config.catalog is not None:
        return rating.catalog_from_data(config.catalog, f"{config.source}: catalog")
    return None


def mapped_allocations(config: Config) -> list[str]:
    accounts = config.accounts
    names = set(accounts.exact.values()) | {a for _, a in accounts.patterns}
    if accounts.default:
        names.add(accounts.default)
    return sorted(names)


def mapped_skus(config: Config) -> list[str]:
    parts = config.partitions
    charges = [c for cs in parts.exact.values() for c in cs]
    charges += [c for _, cs in parts.patterns for c in cs] + list(parts.default)
    return sorted({c.sku for c in charges})


def catalog_warnings(config: Config, catalog: rating.Catalog) -> list[str]:
    return [
        f"SKU {sku} is mapped in partitions but missing from the catalog: dry runs cannot rate it"
        for sku in mapped_skus(config)
        if sku not in catalog.skus
    ]


def check_online(config: Config, client: api.AllocationsClient) -> list[str]:
    """Problems found on the API: a refused key, missing allocations or SKU codes."""
    problems = []
    for name in mapped_allocations(config):
        try:
            client.get_allocation(name)
        except ApiError as exc:
            problems.append(f"allocation {name!r}: {exc}")
    codes: set[str] = set()
    for unit in client.list_units():
        codes.update(str(s.get("code")) for s in client.list_skus(str(unit.get("name"))))
    problems += [
        f"SKU {sku!r} is not among the organisation's SKUs"
        for sku in mapped_skus(config)
        if sku not in codes
    ]
    return problems


def pull_catalog(client: api.AllocationsClient, pulled_at: datetime) -> rating.Catalog:
    """The organisation's units, SKUs (archived ones too) and rate rules, from the API."""
    units = client.list_units()
    skus_by_unit: dict[str, list[dict[str, object]]] = {}
    rules_by_sku: dict[str, list[dict[str, object]]] = {}
    for unit in units:
        name = str(unit.get("name"))
        skus = client.list_skus(name, include_archived=True)
        skus_by_unit[name] = skus
        for sku in skus:
            sku_id = str(sku.get("id"))
            rules_by_sku[sku_id] = client.list_sku_rules(name, sku_id)
    return rating.catalog_from_api(units, skus_by_unit, rules_by_sku, pulled_at=pulled_at)
