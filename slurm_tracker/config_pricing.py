"""The optional ``pricing:`` section of the configuration (the cost report, ``report``).

Hourly prices per allocated resource, by partition, and node prices (by node name) for the
overhead of idle capacity. Only the report reads it; billing always rates through the catalog.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Optional

from yaml.nodes import Node, SequenceNode

from slurm_tracker.config_nodes import Entry, NodeReader, Where, is_glob, is_null, kind_of
from slurm_tracker.redaction import quoted

PRICING_KEYS = ("currency", "partitions", "default", "nodes")
RESOURCE_PRICE_KEYS = ("cpu_hour", "mem_gb_hour", "gpu_hour")
_NODE_PRICE_KEYS = ("names", "node_hour")
_HOSTLIST = re.compile(r"[A-Za-z0-9_.*?-]*(?:\[[0-9,\-]+\][A-Za-z0-9_.*?-]*)*")
_CURRENCY = re.compile(r"[A-Za-z][A-Za-z0-9 ._-]{0,23}")


@dataclass(frozen=True)
class ResourcePrices:
    """Price of one hour of one allocated CPU, GB of memory (1024 MiB) and GPU."""

    cpu_hour: Decimal = Decimal(0)
    mem_gb_hour: Decimal = Decimal(0)
    gpu_hour: Decimal = Decimal(0)


@dataclass(frozen=True)
class NodePrice:
    """What one node costs per hour, allocated or idle. ``names`` is a Slurm hostlist
    (``node[01-16]``: those nodes exist, idle ones too) or a glob (``gpu*``: matches the nodes
    runs used)."""

    names: str
    node_hour: Decimal


@dataclass(frozen=True)
class PricingConfig:
    currency: str = "USD"
    exact: Mapping[str, ResourcePrices] = field(default_factory=dict)
    patterns: tuple[tuple[str, ResourcePrices], ...] = ()
    default: Optional[ResourcePrices] = None
    nodes: tuple[NodePrice, ...] = ()


def read_pricing(reader: NodeReader, entry: Optional[Entry]) -> Optional[PricingConfig]:
    """The `pricing` section; None when absent. Every problem is added to ``reader``."""
    if entry is None or is_null(entry.value):
        return None
    path: Where = ("pricing",)
    fields = reader.fields(entry.value, path, PRICING_KEYS)
    if fields is None:
        return None
    currency = "USD"
    if "currency" in fields:
        text = reader.name(fields["currency"].value, (*path, "currency"), "a currency name")
        if text is not None and not _CURRENCY.fullmatch(text):
            reader.add(
                (*path, "currency"),
                fields["currency"].value,
                f"{quoted(text)} is not a currency name (letters first, at most 24 characters, "
                "e.g. USD, EUR, credits)",
            )
        elif text is not None:
            currency = text
    exact: dict[str, ResourcePrices] = {}
    patterns: list[tuple[str, ResourcePrices]] = []
    if "partitions" in fields:
        part_path: Where = (*path, "partitions")
        pairs = reader.pairs(fields["partitions"].value, part_path, "partition -> prices")
        for key_node, value_node in pairs or []:
            name = reader.name(key_node, part_path, "a Slurm partition name")
            if name is None:
                continue
            prices = _resource_prices(reader, value_node, (*part_path, name))
            if prices is not None:
                if is_glob(name):
                    patterns.append((name, prices))
                else:
                    exact[name] = prices
    default = None
    if "default" in fields and not is_null(fields["default"].value):
        default = _resource_prices(reader, fields["default"].value, (*path, "default"))
    nodes = _node_prices(reader, fields.get("nodes"), (*path, "nodes"))
    if not any(key in fields for key in ("partitions", "default", "nodes")):
        reader.add(
            path,
            entry.value,
            "prices nothing: give pricing.partitions (or pricing.default) with cpu_hour, "
            "mem_gb_hour, gpu_hour, and/or pricing.nodes with node_hour; or remove the section "
            "(the report then uses the rating catalog)",
        )
    return PricingConfig(currency, exact, tuple(patterns), default, nodes)


def _resource_prices(reader: NodeReader, node: Node, path: Where) -> Optional[ResourcePrices]:
    fields = reader.fields(node, path, RESOURCE_PRICE_KEYS)
    if fields is None:
        return None
    if not fields:
        reader.add(path, node, f"give at least one of {', '.join(RESOURCE_PRICE_KEYS)}")
        return None
    values = {
        key: reader.decimal(fields.get(key), (*path, key), Decimal(0))
        for key in RESOURCE_PRICE_KEYS
    }
    return ResourcePrices(**values)


def _node_prices(reader: NodeReader, entry: Optional[Entry], path: Where) -> tuple[NodePrice, ...]:
    if entry is None or is_null(entry.value):
        return ()
    if not isinstance(entry.value, SequenceNode):
        reader.add(
            path,
            entry.value,
            f"expected a list of {{names: HOSTLIST, node_hour: PRICE}}; got {kind_of(entry.value)}",
        )
        return ()
    found: list[NodePrice] = []
    for index, item in enumerate(entry.value.value):
        item_path: Where = (*path, index)
        fields = reader.fields(item, item_path, _NODE_PRICE_KEYS)
        if fields is None:
            continue
        missing = [key for key in _NODE_PRICE_KEYS if key not in fields]
        if missing:
            reader.add(item_path, item, f"{' and '.join(missing)}: required")
            continue
        names = reader.name(fields["names"].value, (*item_path, "names"), "a hostlist")
        price = reader.decimal(fields["node_hour"], (*item_path, "node_hour"), Decimal(-1))
        if names is not None and not _HOSTLIST.fullmatch(names.replace(",", "")):
            reader.add(
                (*item_path, "names"),
                fields["names"].value,
                f"{quoted(names)} is not a Slurm hostlist (node[01-16],gpu[1-4]) or a glob (gpu*)",
            )
        elif names is not None and price >= 0:
            found.append(NodePrice(names, price))
    return tuple(found)
