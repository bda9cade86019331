"""Prices of the cost report: what an hour of a run's allocation costs, and what a node costs.

Two sources, chosen in one place (:func:`prices_for`):

* the config's optional ``pricing`` section: hourly prices per allocated CPU, GB of memory and
  GPU, by partition (exact names, then globs, then ``default``), in one currency;
* otherwise the rating catalog of the SKUs the partition is mapped to (``partitions.map``), with
  its effective-dated rules: each SKU's metric (cpu, mem, gpu, node, billing) is priced at
  ``sku_rate x unit_rate`` (USD when the unit is rated in USD, else the unit itself), under the
  metric's cost resource (billing_metrics: node and billing SKUs are "other" allocated cost).
  Memory SKUs count the report's allocated memory (the larger of requested and used).

Node prices (for the overhead of idle capacity) only come from ``pricing.nodes``.
Nothing here raises for a run: a price that cannot be found is a note, and that run's span is
unpriced (cost 0), which the report says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Optional, TypeVar

from slurm_tracker import rating
from slurm_tracker.billing_metrics import COST_RESOURCES, active
from slurm_tracker.config import Config, PartitionMapping, PricingConfig, ResourcePrices
from slurm_tracker.costs.steps import RunUsage, expand_hostlist

T = TypeVar("T")

#: Resources of the allocated cost; "other" is what node and billing SKUs charge. Which one a
#: SKU's metric is priced under is the metric's ``resource`` (billing_metrics).
RESOURCES = COST_RESOURCES
_GLOB = frozenset("*?")


@dataclass(frozen=True)
class Span:
    """Over [start_at, end_at) the run's allocation costs ``per_hour`` (by resource)."""

    start_at: datetime
    end_at: datetime
    per_hour: Mapping[str, Decimal]


@dataclass
class Prices:
    """What the report prices with. ``currency`` is None when nothing can be priced."""

    currency: Optional[str]
    pricing: Optional[PricingConfig] = None
    partitions: Optional[PartitionMapping] = None
    catalog: Optional[rating.Catalog] = None
    notes: list[str] = field(default_factory=list)
    _node_cache: dict[str, Optional[Decimal]] = field(default_factory=dict)
    _hostlists: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def has_nodes(self) -> bool:
        return bool(self.pricing and self.pricing.nodes)

    def known_nodes(self) -> tuple[str, ...]:
        """Nodes that exist whether runs used them or not (hostlists of ``pricing.nodes``)."""
        names: list[str] = []
        for entry in self.pricing.nodes if self.pricing else ():
            if not _GLOB.intersection(entry.names):
                names.extend(expand_hostlist(entry.names))
        return tuple(dict.fromkeys(names))

    def node_hour(self, node: str) -> Optional[Decimal]:
        """The hourly price of ``node`` (the first entry naming it), None when not priced."""
        if node not in self._node_cache:
            self._node_cache[node] = None
            for entry in self.pricing.nodes if self.pricing else ():
                if _GLOB.intersection(entry.names):
                    hit = any(fnmatchcase(node, p) for p in entry.names.split(","))
                else:
                    hit = node in self._hostlist(entry.names)
                if hit:
                    self._node_cache[node] = entry.node_hour
                    break
        return self._node_cache[node]

    def _hostlist(self, names: str) -> frozenset[str]:
        if names not in self._hostlists:
            self._hostlists[names] = frozenset(expand_hostlist(names))
        return self._hostlists[names]

    def spans(self, usage: RunUsage, start_at: datetime, end_at: datetime) -> list[Span]:
        """The run's hourly cost by resource over [start_at, end_at), cut where rates change."""
        if end_at <= start_at:
            return []
        if self.pricing is not None and (
            self.pricing.exact or self.pricing.patterns or self.pricing.default
        ):
            return self._config_spans(usage, start_at, end_at)
        if self.catalog is not None and self.partitions is not None:
            return self._catalog_spans(usage, start_at, end_at)
        return []

    def note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < 50:
            self.notes.append(text)

    def _config_spans(self, usage: RunUsage, start_at: datetime, end_at: datetime) -> list[Span]:
        assert self.pricing is not None
        partition = usage.record.partition
        found = _lookup(partition, self.pricing.exact, self.pricing.patterns)
        prices: Optional[ResourcePrices] = found or self.pricing.default
        if prices is None:
            self.note(f"partition {partition!r} has no price in pricing.partitions: not priced")
            return []
        tres = usage.record.tres
        per_hour = {
            "cpu": tres.cpu * prices.cpu_hour,
            "mem": usage.mem_allocated_gb * prices.mem_gb_hour,
            "gpu": tres.gpu * prices.gpu_hour,
        }
        return [Span(start_at, end_at, per_hour)]

    def _catalog_spans(self, usage: RunUsage, start_at: datetime, end_at: datetime) -> list[Span]:
        assert self.catalog is not None and self.partitions is not None
        mapping = self.partitions
        partition = usage.record.partition
        if any(fnmatchcase(partition, pattern) for pattern in mapping.ignore):
            return []
        charges = _lookup(partition, mapping.exact, mapping.patterns) or mapping.default
        if not charges:
            self.note(f"partition {partition!r} maps to no SKU: its runs are not priced")
            return []
        cuts = {start_at, end_at}
        for charge in charges:
            try:
                cuts.update(rating.boundaries(self.catalog, charge.sku, start_at, end_at))
            except rating.RateMissing as exc:
                self.note(str(exc))
        points = sorted(cuts)
        metrics = active()
        spans = []
        for low, high in zip(points, points[1:]):
            per_hour: dict[str, Decimal] = {}
            for charge in charges:
                price = self._sku_price(charge.sku, low, high)
                if price is None:
                    continue
                resource = metrics[charge.metric].resource
                count = (
                    usage.mem_allocated_gb
                    if charge.metric == "mem"
                    else usage.record.tres.count(charge.metric)
                )
                per_hour[resource] = per_hour.get(resource, Decimal(0)) + count * price
            spans.append(Span(low, high, per_hour))
        return spans

    def _sku_price(self, sku: str, low: datetime, high: datetime) -> Optional[Decimal]:
        assert self.catalog is not None
        try:
            rated = rating.rate(self.catalog, sku, Decimal(1), low, high)
        except rating.RateMissing as exc:
            self.note(f"{exc} (not priced)")
            return None
        if rated.unit_rate is not None:
            return rated.sku_rate * rated.unit_rate
        return rated.sku_rate


def _lookup(name: str, exact: Mapping[str, T], patterns: Sequence[tuple[str, T]]) -> Optional[T]:
    if name in exact:
        return exact[name]
    for pattern, value in patterns:
        if fnmatchcase(name, pattern):
            return value
    return None


def catalog_currency(catalog: rating.Catalog, partitions: PartitionMapping) -> Optional[str]:
    """USD when every mapped SKU's unit is rated in USD; else the unit name(s)."""
    charges = [c for cs in partitions.exact.values() for c in cs]
    charges += [c for _, cs in partitions.patterns for c in cs]
    charges += list(partitions.default)
    names = set()
    for charge in charges:
        sku = catalog.skus.get(charge.sku)
        unit = catalog.units.get(sku.unit) if sku is not None else None
        if unit is not None:
            names.add("USD" if unit.rated_in_usd else unit.name)
    return "/".join(sorted(names)) if names else None


def prices_for(config: Config, catalog: Optional[rating.Catalog]) -> Prices:
    """The report's prices: the ``pricing`` section's, else the catalog's, else none."""
    pricing = config.pricing
    if pricing is not None and (pricing.exact or pricing.patterns or pricing.default):
        return Prices(pricing.currency, pricing=pricing)
    prices = Prices(None, pricing=pricing)
    if catalog is not None:
        currency = catalog_currency(catalog, config.partitions)
        prices = Prices(currency, pricing, config.partitions, catalog)
        if currency is not None and "/" in currency:
            prices.note(
                f"the mapped SKUs are in different units ({currency}): costs add them up as is; "
                "give a pricing section for one currency"
            )
        if pricing is not None and currency is not None and currency != pricing.currency:
            prices.note(
                f"node prices are in {pricing.currency} but the catalog rates in {currency}"
            )
    elif pricing is not None:
        prices = Prices(pricing.currency, pricing=pricing)
    return prices
