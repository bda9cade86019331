"""The catalog file: reading it (:func:`load_catalog_file`) and writing it (:func:`dump_catalog`).

The file is YAML read with the hardened loader shared with the configuration (yaml_safe.py),
numbers with a fraction read as Decimal from their text. Its data is checked by catalog.py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError

from slurm_tracker.catalog import TOP_KEYS, Problems, validated_catalog
from slurm_tracker.errors import ConfigError, UnsafeFile
from slurm_tracker.files import read_trusted
from slurm_tracker.rating import CATALOG_VERSION, Catalog, RateRule, Sku, _text
from slurm_tracker.redaction import shown_value
from slurm_tracker.yaml_safe import GuardedLoader, YamlRefused, describe_yaml_error

logger = logging.getLogger(__name__)


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
    problems = Problems(source)
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
            f"{', '.join(TOP_KEYS)}): check catalog_file, or write it with `catalog pull`"
        )
        raise ConfigError(source, problems.items)
    catalog = validated_catalog(data, problems, source, require_version=True)
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
