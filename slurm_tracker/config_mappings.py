"""The ``accounts:`` and ``partitions:`` sections: Slurm names mapped to allocations and SKUs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Optional, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slurm_tracker.billing_metrics import active
from slurm_tracker.config_model import CHARGE_KEYS, CONFIG_KEYS, AccountMapping, PartitionMapping
from slurm_tracker.config_nodes import (
    NULL_TAG,
    Entry,
    NodeReader,
    Where,
    did_you_mean,
    is_glob,
    is_null,
    kind_of,
    line_of,
)
from slurm_tracker.models import Metric, SkuCharge
from slurm_tracker.redaction import quoted, shown_value

_T = TypeVar("_T")
_MAX_ALLOCATION_NAME = 255  # the API's limit


class MappingReader(NodeReader):
    """The accounts and partitions sections (map, default, ignore)."""

    def accounts(self, entry: Optional[Entry]) -> AccountMapping:
        exact, patterns, default, ignore = self.name_map(
            entry, "account", "allocation name", "allocations", self.allocation
        )
        return AccountMapping(exact=exact, patterns=patterns, default=default, ignore=ignore)

    def name_map(
        self,
        entry: Optional[Entry],
        what: str,
        target: str,
        targets: str,
        parse_value: Callable[[Node, Where], Optional[_T]],
    ) -> tuple[dict[str, _T], tuple[tuple[str, _T], ...], Optional[_T], tuple[str, ...]]:
        """The `accounts` or `partitions` section: map (exact names and glob patterns, in file
        order), default and ignore list."""
        section = f"{what}s"
        path: Where = (section,)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS[section]) or {}
        exact: dict[str, _T] = {}
        patterns: dict[str, _T] = {}  # insertion order = file order
        key_lines: dict[str, int] = {}
        entries = 0
        if "map" in fields:
            map_path: Where = (*path, "map")
            pairs = self.pairs(fields["map"].value, map_path, f"Slurm {what} -> {target}")
            for key_node, value_node in pairs or []:
                entries += 1
                name = self.name(key_node, map_path, f"a Slurm {what} name")
                if name is None:
                    continue
                value = parse_value(value_node, (*map_path, name))
                key_lines[name] = line_of(key_node)
                if value is not None:
                    (patterns if is_glob(name) else exact)[name] = value
        default: Optional[_T] = None
        has_default = "default" in fields and not is_null(fields["default"].value)
        if has_default:
            default = parse_value(fields["default"].value, (*path, "default"))
        ignore = self.ignore_list(fields.get("ignore"), (*path, "ignore"), key_lines, what)
        if entries == 0 and not has_default:
            self.add(
                path,
                entry.value if entry else None,
                f"no {what} is mapped and there is no {section}.default: nothing would "
                f"ever be billed; map Slurm {what}s to {targets} under {section}.map",
            )
        return exact, tuple(patterns.items()), default, ignore

    def allocation(self, node: Node, path: Where) -> Optional[str]:
        value = self.name(node, path, "an allocation name")
        if value is not None and len(value) > _MAX_ALLOCATION_NAME:
            self.add(
                path,
                node,
                f"an allocation name has at most {_MAX_ALLOCATION_NAME} "
                f"characters; this one has {len(value)}",
            )
            return None
        return value

    def ignore_list(
        self, entry: Optional[Entry], path: Where, mapped: Mapping[str, int], what: str
    ) -> tuple[str, ...]:
        """Names or glob patterns never billed; one that is also mapped is a conflict."""
        article = "an" if what[0] in "aeiou" else "a"

        def read_item(item: Node, item_path: Where) -> Optional[str]:
            return self.name(item, item_path, f"{article} {what} name or pattern")

        def accept(value: str, item: Node, item_path: Where) -> bool:
            if value in mapped:
                self.add(
                    item_path,
                    item,
                    f"{quoted(value)} is both ignored here and mapped at line "
                    f"{mapped[value]}: remove it from one of the two",
                )
                return False
            clashes = [key for key in mapped if not is_glob(key) and fnmatchcase(key, value)]
            if clashes:
                shown = ", ".join(f"{quoted(key)} (line {mapped[key]})" for key in clashes)
                self.add(
                    item_path,
                    item,
                    f"the pattern {quoted(value)} ignores {what}s that are mapped: "
                    f"{shown}; ignoring wins, so narrow the pattern or remove the mapping",
                )
                return False
            return True

        names, _ = self.name_list(
            entry, path, f"a list of {what} names or patterns, e.g. [root]", read_item, accept
        )
        return names

    def partitions(self, entry: Optional[Entry]) -> PartitionMapping:
        exact, patterns, default, ignore = self.name_map(
            entry, "partition", "SKU(s)", "SKUs", self.charges
        )
        return PartitionMapping(
            exact=exact, patterns=patterns, default=default or (), ignore=ignore
        )

    def charges(self, node: Node, path: Where) -> Optional[tuple[SkuCharge, ...]]:
        """A SKU code (metric cpu), one {sku, metric} mapping, or a list of those."""
        items: list[tuple[Node, Where]]
        if isinstance(node, SequenceNode):
            if not node.value:
                self.add(path, node, "the list of SKUs is empty: give at least one")
                return None
            items = [(item, (*path, index)) for index, item in enumerate(node.value)]
        else:
            items = [(node, path)]
        charges: list[SkuCharge] = []
        first_lines: dict[str, int] = {}
        ok = True
        for item, item_path in items:
            charge = self.charge(item, item_path)
            if charge is None:
                ok = False
                continue
            if charge.sku in first_lines:
                self.add(
                    item_path,
                    item,
                    f"SKU {shown_value(charge.sku)} is charged twice for the same runs (also "
                    f"at line {first_lines[charge.sku]}): their events would share one event key",
                )
                ok = False
                continue
            first_lines[charge.sku] = line_of(item)
            charges.append(charge)
        return tuple(charges) if ok else None

    def charge(self, node: Node, path: Where) -> Optional[SkuCharge]:
        if isinstance(node, MappingNode):
            fields = self.fields(node, path, CHARGE_KEYS)
            if fields is None:
                return None
            if "sku" not in fields:
                self.add(
                    path,
                    node,
                    "missing sku: give the SKU code, e.g. {sku: SLURM_CPU_HOUR, metric: cpu}",
                )
                return None
            code = self.sku_code(fields["sku"].value, (*path, "sku"))
            metric: Optional[Metric] = "cpu"
            if "metric" in fields:
                metric = self.metric(fields["metric"].value, (*path, "metric"))
            if code is None or metric is None:
                return None
            return SkuCharge(code, metric)
        if isinstance(node, ScalarNode) and node.tag != NULL_TAG:
            code = self.sku_code(node, path)
            return SkuCharge(code, "cpu") if code is not None else None
        self.add(
            path,
            node,
            "expected a SKU code, a mapping {sku: CODE, metric: cpu} or a list "
            f"of those; got {kind_of(node)}",
        )
        return None

    def sku_code(self, node: Node, path: Where) -> Optional[str]:
        value = self.text(node, path, "a SKU code")
        if value is None:
            return None
        if not value.strip():
            self.add(path, node, "the SKU code is empty")
            return None
        if any(char.isspace() for char in value):
            self.add(
                path,
                node,
                f"the SKU code {quoted(value)} contains blanks: SKU codes "
                "are single words like SLURM_CPU_HOUR",
            )
            return None
        return value

    def metric(self, node: Node, path: Where) -> Optional[Metric]:
        value = self.text(node, path, "a metric")
        if value is None:
            return None
        metrics = active()
        if value in metrics:
            return value
        self.add(
            path,
            node,
            f"unknown metric {quoted(value)}; {did_you_mean(value, metrics.names)}",
        )
        return None
