"""JSON Schemas of the Allocations API bodies the emulator reads and writes, and a small
stdlib validator for them.

Written by this project from the facts of the contract (field names, types, required fields,
``additionalProperties``), not copied from it; ``tests/test_contract.py`` fails when either
side changes. Only the keywords below are used (and understood by :func:`validate`):
``type``, ``properties``, ``required``, ``additionalProperties``, ``items``, ``enum``,
``format: date-time``, ``minLength``, ``maxLength``, ``minimum``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
NUMBER: Schema = {"type": "number"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
DATE_TIME: Schema = {"type": "string", "format": "date-time"}
ANY_OBJECT: Schema = {"type": "object", "additionalProperties": {}}


def _object(required: list[str], properties: Mapping[str, Schema]) -> Schema:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": dict(properties),
    }


def _array_or_null(items: Schema) -> Schema:
    return {"type": ["array", "null"], "items": items}


# --- request bodies ---------------------------------------------------------------------------

POST_USAGE_EVENT_INPUT = _object(
    ["sku", "quantity", "startedAt", "endedAt"],
    {
        "sku": STRING,
        "quantity": NUMBER,
        "startedAt": DATE_TIME,
        "endedAt": DATE_TIME,
        "user": STRING,
        "metadata": ANY_OBJECT,
    },
)

DELETE_USAGE_INPUT = _object(["ids"], {"ids": _array_or_null(STRING)})

# --- responses --------------------------------------------------------------------------------

USAGE_EVENT_OUTPUT = _object(
    ["id", "organization", "allocation", "quantity", "startedAt", "endedAt", "createdAt"],
    {
        "id": STRING,
        "organization": STRING,
        "allocation": STRING,
        "quantity": NUMBER,
        "startedAt": DATE_TIME,
        "endedAt": DATE_TIME,
        "createdAt": DATE_TIME,
    },
)

RATED_COST = _object(
    [
        "id",
        "organizationId",
        "allocationId",
        "unitId",
        "quantity",
        "amount",
        "startedAt",
        "endedAt",
        "type",
        "subtype",
        "unitAppliedRate",
        "skuAppliedRate",
        "createdAt",
        "usageEventId",
    ],
    {
        "id": STRING,
        "organizationId": STRING,
        "allocationId": STRING,
        "unitId": STRING,
        "usageEventId": STRING,
        "quantity": NUMBER,
        "amount": NUMBER,
        "unitAppliedRate": NUMBER,
        "skuAppliedRate": NUMBER,
        "startedAt": DATE_TIME,
        "endedAt": DATE_TIME,
        "createdAt": DATE_TIME,
        "type": STRING,
        "subtype": STRING,
        "attributedToUsername": STRING,
        "createdByUsername": STRING,
        "metadata": ANY_OBJECT,
    },
)

RATED_COSTS_PAGE = _object(
    ["items", "total", "page", "pageSize", "totalPages"],
    {
        "items": _array_or_null(RATED_COST),
        "total": INTEGER,
        "page": INTEGER,
        "pageSize": INTEGER,
        "totalPages": INTEGER,
    },
)

DELETE_USAGE_OUTPUT = _object(["deleted"], {"deleted": INTEGER})

ERROR = _object(
    ["error", "message"],
    {
        "error": BOOLEAN,
        "message": STRING,
        "code": STRING,
        "errors": _array_or_null(STRING),
        "params": ANY_OBJECT,
    },
)

FIELD_ERROR = _object(
    ["type", "code"],
    {
        "type": {"type": "string", "format": "uri-reference"},
        "code": STRING,
        "detail": STRING,
        "in": {"type": "string", "enum": ["query", "path", "header", "cookie"]},
        "parameter": STRING,
        "pointer": STRING,
        "params": ANY_OBJECT,
    },
)

PROBLEM = _object(
    ["type"],
    {
        "type": {"type": "string", "format": "uri-reference"},
        "title": STRING,
        "status": INTEGER,
        "detail": STRING,
        "instance": {"type": "string", "format": "uri-reference"},
        "code": STRING,
        "errors": _array_or_null(FIELD_ERROR),
        "params": ANY_OBJECT,
    },
)

CROSSED_THRESHOLD = _object(
    ["threshold", "actions"], {"threshold": NUMBER, "actions": _array_or_null(STRING)}
)

ALLOCATION = _object(
    ["name", "unit", "total"],
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 255},
        "unit": STRING,
        "total": {"type": "number", "minimum": 0},
        "parent": STRING,
        "type": {"type": "string", "enum": ["managed", "custom"]},
        "allowed": _array_or_null(
            {
                "type": "string",
                "enum": ["aws", "azure", "google", "oracle", "openstack", "kubernetes", "ai"],
            }
        ),
        "canEditTotal": BOOLEAN,
        "currentOrgThreshold": INTEGER,
        "estimatedUsed": NUMBER,
        "hasCloudUsage": BOOLEAN,
        "ratedInUsd": BOOLEAN,
        "resourceGroups": INTEGER,
        "threshold": CROSSED_THRESHOLD,
        "unusableReason": {"type": "string", "enum": ["no-budget", "over-threshold"]},
        "usable": BOOLEAN,
        "used": NUMBER,
    },
)

UNIT_RULE = _object(
    ["id", "unitId", "effectiveFrom", "rate"],
    {
        "id": STRING,
        "unitId": STRING,
        "effectiveFrom": DATE_TIME,
        "effectiveTo": DATE_TIME,
        "rate": NUMBER,
    },
)

UNIT = _object(
    ["id", "organizationId", "name", "ratedInUsd", "Rules"],
    {
        "id": STRING,
        "organizationId": STRING,
        "name": STRING,
        "ratedInUsd": BOOLEAN,
        "Rules": _array_or_null(UNIT_RULE),
        "createdAt": DATE_TIME,
    },
)

CUSTOM_SKU = _object(
    ["id", "organizationId", "code", "name", "unitId", "type", "subtype", "currentRate"],
    {
        "id": STRING,
        "organizationId": STRING,
        "code": STRING,
        "name": STRING,
        "unitId": STRING,
        "type": STRING,
        "subtype": STRING,
        "currentRate": NUMBER,
        "description": STRING,
        "deletedAt": DATE_TIME,
    },
)

CUSTOM_SKU_RULE = _object(
    ["id", "customSkuId", "effectiveFrom", "rate"],
    {
        "id": STRING,
        "customSkuId": STRING,
        "effectiveFrom": DATE_TIME,
        "effectiveTo": DATE_TIME,
        "rate": NUMBER,
    },
)

#: The contract's schema name for each of ours (tests/test_contract.py compares them).
CONTRACT_NAMES: Mapping[str, Schema] = {
    "PostUsageEventInput": POST_USAGE_EVENT_INPUT,
    "DeleteRatedCostsRequestBody": DELETE_USAGE_INPUT,
    "UsageEventOutput": USAGE_EVENT_OUTPUT,
    "RatedCostWithMetadata": RATED_COST,
    "RatedCostsPaginatedResponse": RATED_COSTS_PAGE,
    "DeleteRatedCostsResponseBody": DELETE_USAGE_OUTPUT,
    "Error": ERROR,
    "FieldError": FIELD_ERROR,
    "Problem": PROBLEM,
    "CrossedThreshold": CROSSED_THRESHOLD,
    "Allocation": ALLOCATION,
    "UnitRule": UNIT_RULE,
    "Unit": UNIT,
    "CustomSku": CUSTOM_SKU,
    "CustomSkuRule": CUSTOM_SKU_RULE,
}

# --- validation -------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)


def is_rfc3339(text: str) -> bool:
    """An RFC 3339 date-time with an offset (``2026-01-31T23:59:59Z``, ``...+02:00``)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        datetime(year, month, day, hour, minute, min(second, 59))  # leap second 60 allowed
    except ValueError:
        return False
    return second <= 60


def parse_rfc3339(text: str) -> datetime:
    """The aware datetime of an RFC 3339 text (ValueError when it is not one)."""
    if not is_rfc3339(text):
        raise ValueError(f"not an RFC 3339 date-time: {text!r}")
    head, _, _ = text.partition(".")
    match = _RFC3339.fullmatch(text)
    assert match is not None
    fraction = (match.group(7) or ".0")[1:7].ljust(6, "0")
    offset = match.group(8).upper().replace("Z", "+00:00")
    base = head[:19].replace("t", "T")
    if base.endswith(":60"):
        base = base[:-2] + "59"
    return datetime.fromisoformat(f"{base}.{fraction}{offset}")


def _type_ok(value: object, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if isinstance(value, bool):
        return False
    if name == "number":
        return isinstance(value, (int, float, Decimal))
    if name == "integer":
        if isinstance(value, int):
            return True
        if isinstance(value, float):
            return value.is_integer()
        if isinstance(value, Decimal):
            return value.is_finite() and value == value.to_integral_value()
        return False
    raise ValueError(f"unknown JSON type {name!r} in a schema")


def _json_type(value: object) -> str:
    for name in ("null", "boolean", "string", "object", "array", "integer", "number"):
        if _type_ok(value, name):
            return name
    return type(value).__name__


def validate(instance: object, schema: Mapping[str, Any], pointer: str = "#") -> list[str]:
    """Every way ``instance`` breaks ``schema``, as ``"<JSON pointer>: <what>"`` lines."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(instance, n) for n in names):
            return [f"{pointer}: expected {' or '.join(names)}, got {_json_type(instance)}"]
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{pointer}: must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(instance, str):
        if schema.get("format") == "date-time" and not is_rfc3339(instance):
            problems.append(f"{pointer}: must be an RFC 3339 date-time, got {instance!r}")
        if "minLength" in schema and len(instance) < schema["minLength"]:
            problems.append(f"{pointer}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            problems.append(f"{pointer}: longer than {schema['maxLength']} characters")
    minimum = schema.get("minimum")
    if minimum is not None and _type_ok(instance, "number") and Decimal(str(instance)) < minimum:
        problems.append(f"{pointer}: must be at least {schema['minimum']}")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in instance:
                problems.append(f"{pointer}: required property {name!r} is missing")
        extra = schema.get("additionalProperties", {})
        for name, value in instance.items():
            where = f"{pointer}/{_escape(name)}"
            if name in properties:
                problems.extend(validate(value, properties[name], where))
            elif extra is False:
                problems.append(f"{where}: unknown property {name!r} is not allowed")
            elif isinstance(extra, Mapping) and extra:
                problems.extend(validate(value, extra, where))
    if isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            problems.extend(validate(value, schema["items"], f"{pointer}/{i}"))
    return problems


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
