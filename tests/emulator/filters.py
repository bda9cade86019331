"""The usage list filters of the contract, for the emulator's ``GET .../usage`` and
``DELETE .../usage/all``.

Each is read from the contract's parameter description (``tests/test_contract.py`` checks that
this table covers every filter parameter of both operations, with the same field and
operator):

- ``startedAtFrom``/``startedAtTo``, ``endedAtFrom``/``endedAtTo``,
  ``createdAtFrom``/``createdAtTo``: ``>=`` / ``<=`` an RFC 3339 date-time, compared as instants
  (``2026-03-01T02:00:00+02:00`` equals ``2026-03-01T00:00:00Z``);
- ``quantityMin``/``Max``, ``amountMin``/``Max``, ``unitRateMin``/``Max``: ``>=`` / ``<=`` a
  number, compared exactly (as decimals) with the stored value;
- ``type``, ``subtype``: the field contains the text, case-insensitively;
- ``metadata``: the metadata's JSON text contains the text, case-insensitively.

Every bound is inclusive. An empty value is no filter. A value that is not a date-time or a
number is refused (:class:`InvalidQuery`, a 400). Other query parameters are ignored, as HTTP
APIs usually do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Callable, Literal, Protocol, Union

from tests.emulator import schemas

Operator = Literal[">=", "<=", "contains"]
Kind = Literal["time", "number", "text", "json"]


class Filterable(Protocol):
    """What the filters read of a stored event."""

    @property
    def started_at(self) -> str: ...
    @property
    def ended_at(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def quantity(self) -> Decimal: ...
    @property
    def amount(self) -> Decimal: ...
    @property
    def unit_rate(self) -> Decimal: ...
    @property
    def type(self) -> str: ...
    @property
    def subtype(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class FilterSpec:
    """One query parameter: the contract's column (``started_at``...), its operator, how the
    value is read, and the stored event's attribute it compares."""

    parameter: str
    column: str
    operator: Operator
    kind: Kind
    attribute: str


def _pair(parameter: str, column: str, kind: Kind, attribute: str) -> tuple[FilterSpec, ...]:
    low, high = ("From", "To") if kind == "time" else ("Min", "Max")
    return (
        FilterSpec(parameter + low, column, ">=", kind, attribute),
        FilterSpec(parameter + high, column, "<=", kind, attribute),
    )


FILTERS: tuple[FilterSpec, ...] = (
    *_pair("startedAt", "started_at", "time", "started_at"),
    *_pair("endedAt", "ended_at", "time", "ended_at"),
    *_pair("createdAt", "created_at", "time", "created_at"),
    *_pair("quantity", "quantity", "number", "quantity"),
    *_pair("unitRate", "unit_applied_rate", "number", "unit_rate"),
    *_pair("amount", "amount", "number", "amount"),
    FilterSpec("type", "type", "contains", "text", "type"),
    FilterSpec("subtype", "subtype", "contains", "text", "subtype"),
    FilterSpec("metadata", "metadata", "contains", "json", "metadata"),
)

#: The instant of a stored RFC 3339 text (cached: every list request reads every event's).
instant: Callable[[str], datetime] = lru_cache(maxsize=1 << 16)(schemas.parse_rfc3339)

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class InvalidQuery(ValueError):
    """Query parameters that cannot be read; ``problems`` are ``"<name>: <what>"`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def metadata_text(metadata: Mapping[str, Any]) -> str:
    """The JSON text the ``metadata`` filter searches: numbers as numbers, ``": "`` and
    ``", "`` separators, non-ASCII characters as themselves (as PostgreSQL prints ``jsonb``;
    the contract does not say: the client's :func:`slurm_tracker.api.search_term` avoids
    every character a server might escape)."""

    def number(value: object) -> object:
        if isinstance(value, Decimal):
            return int(value) if value == value.to_integral_value() else float(value)
        return str(value)

    return json.dumps(metadata, default=number, ensure_ascii=False)


Value = Union[datetime, Decimal, str]


def _read(spec: FilterSpec, text: str) -> Value:
    if spec.kind == "time":
        try:
            return schemas.parse_rfc3339(text)
        except ValueError:
            raise InvalidQuery(
                [f"{spec.parameter}: expected an RFC 3339 date-time, got {text!r}"]
            ) from None
    if spec.kind == "number":
        if not _NUMBER.fullmatch(text):
            raise InvalidQuery([f"{spec.parameter}: expected a number, got {text!r}"])
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            raise InvalidQuery([f"{spec.parameter}: expected a number, got {text!r}"]) from None
    return text.lower()


def _stored(spec: FilterSpec, event: Filterable) -> Value:
    value = getattr(event, spec.attribute)
    if spec.kind == "time":
        return instant(value)
    if spec.kind == "json":
        return metadata_text(value).lower()
    if spec.kind == "text":
        return str(value).lower()
    return Decimal(value)


def _test(operator: Operator) -> Callable[[Any, Any], bool]:
    if operator == ">=":
        return lambda stored, wanted: bool(stored >= wanted)
    if operator == "<=":
        return lambda stored, wanted: bool(stored <= wanted)
    return lambda stored, wanted: wanted in stored


@dataclass(frozen=True)
class UsageFilter:
    """The filters of one request (every one must hold)."""

    terms: tuple[tuple[FilterSpec, Value], ...]

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> UsageFilter:
        """Read the filter parameters of ``query``; :class:`InvalidQuery` lists every bad one."""
        terms: list[tuple[FilterSpec, Value]] = []
        problems: list[str] = []
        for spec in FILTERS:
            text = query.get(spec.parameter, "")
            if text == "":
                continue
            try:
                terms.append((spec, _read(spec, text)))
            except InvalidQuery as exc:
                problems.extend(exc.problems)
        if problems:
            raise InvalidQuery(problems)
        return cls(tuple(terms))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def matches(self, event: Filterable) -> bool:
        return all(_test(spec.operator)(_stored(spec, event), value) for spec, value in self.terms)
