"""The client and the emulator against the Allocations API contract (OpenAPI 3.1).

- every request body the client sends validates against the contract's request schemas;
- every emulator answer the client reads validates against the contract's response schemas;
- the emulator's own schemas (tests/emulator/schemas.py) say the same as the contract, so this
  fails when either side changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]

from slurm_tracker.api import AllocationsClient, deliver
from tests.conftest import need_shared
from tests.emulator import DEFAULT_API_KEY, DEFAULT_ORGANIZATION, Emulator
from tests.emulator import schemas as ours

ORG_PATH = "/api/organizations/{organization}"
#: The operations slurm-tracker uses, by (path under ORG_PATH, method).
USED_OPERATIONS = [
    ("/allocations/{name}/usage", "post"),
    ("/allocations/{name}/usage", "get"),
    ("/allocations/{name}/usage", "delete"),
    ("/allocations/{name}", "get"),
    ("/units", "get"),
    ("/units/{unit}/skus", "get"),
    ("/units/{unit}/skus/{sku}/rules", "get"),
]


class Contract(dict):  # type: ignore[type-arg]
    """The OpenAPI document; a short repr keeps hypothesis reports readable."""

    def __repr__(self) -> str:
        return "<the Allocations API contract>"


@pytest.fixture(scope="module")
def contract() -> Contract:
    path: Path = need_shared("reference/allocations-openapi.json")
    return Contract(json.loads(path.read_text(encoding="utf-8")))


def date_time_checker() -> FormatChecker:
    """date-time checked the same way on both sides (RFC 3339), whatever extras are installed."""
    checker = FormatChecker(formats=())
    checker.checks("date-time")(lambda value: not isinstance(value, str) or ours.is_rfc3339(value))
    return checker


def validator(contract: Mapping[str, Any], schema: Mapping[str, Any]) -> Draft202012Validator:
    """A Draft 2020-12 validator of ``schema`` whose ``#/components/...`` refs resolve in the
    contract document."""
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "components": contract["components"],
    }
    return Draft202012Validator(root, format_checker=date_time_checker())


def component(contract: Mapping[str, Any], name: str) -> Draft202012Validator:
    return validator(contract, {"$ref": f"#/components/schemas/{name}"})


def operation(contract: Mapping[str, Any], path: str, method: str) -> dict[str, Any]:
    return dict(contract["paths"][ORG_PATH + path][method])


def response_schema(
    contract: Mapping[str, Any], path: str, method: str, status: int, content_type: str
) -> dict[str, Any]:
    if content_type == "application/problem+json":  # the shared Problem response
        return dict(
            contract["components"]["responses"]["Problem"]["content"][content_type]["schema"]
        )
    responses_ = operation(contract, path, method)["responses"]
    answer = responses_.get(str(status), responses_["default"])
    return dict(answer["content"][content_type]["schema"])


def errors_of(v: Draft202012Validator, instance: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(instance)]


# --- requests the client sends -----------------------------------------------------------------

BODIES: list[dict[str, Any]] = [
    {
        "sku": "CPU_HOUR",
        "quantity": 1.5,
        "startedAt": "2026-03-01T00:00:00Z",
        "endedAt": "2026-03-01T01:00:00Z",
    },
    {
        "sku": "GPU_HOUR",
        "quantity": Decimal("0.000001"),
        "startedAt": datetime(2026, 3, 1, tzinfo=timezone.utc),
        "endedAt": datetime(2026, 3, 1, 0, 0, 1, tzinfo=timezone.utc),
        "user": "alice",
        "metadata": {
            "eventKey": "st1:c:1:100:0-1:GPU_HOUR",
            "jobId": "12_3",
            "elapsedTo": 1,
            "nested": {"a": [1, 2]},
        },
    },
    {
        "sku": "MEM",
        "quantity": 12,
        "startedAt": "2026-03-01T00:00:00.123+02:00",
        "endedAt": "2026-03-01T00:00:00.123+02:00",
        "metadata": {},
    },
]


@pytest.fixture
def captured() -> Iterator[list[tuple[str, Any]]]:
    """(method, JSON body) of every request the client makes, answered plausibly."""
    sent: list[tuple[str, Any]] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body) if request.body else None
        sent.append((str(request.method), body))
        if request.method == "POST":
            return 200, {}, json.dumps({"id": "ue-1"})
        if request.method == "DELETE":
            return 200, {}, json.dumps({"deleted": 1})
        return 200, {}, json.dumps({"items": [], "total": 0, "page": 1, "totalPages": 0})

    with responses.RequestsMock() as mock:
        for method in ("POST", "GET", "DELETE"):
            mock.add_callback(
                method,
                "https://api.example.test/api/organizations/acme/allocations/physics/usage",
                callback=answer,
            )
        yield sent


def test_every_body_the_client_sends_validates(
    contract: Mapping[str, Any], captured: list[tuple[str, Any]]
) -> None:
    client = AllocationsClient("https://api.example.test", "acme", "pwt_x.y", sleep=lambda s: None)
    for body in BODIES:
        key = body.get("metadata", {}).get("eventKey", "k")
        deliver(
            client, "physics", body, key, outcome_unknown_before=True, before_attempt=lambda n: None
        )
        client.post_usage("physics", body)
    client.delete_usage("physics", ["rc-1"])

    posts = [body for method, body in captured if method == "POST"]
    deletes = [body for method, body in captured if method == "DELETE"]
    assert len(posts) == 2 * len(BODIES) and len(deletes) == 1
    post_schema = operation(contract, "/allocations/{name}/usage", "post")["requestBody"]
    post_v = validator(contract, post_schema["content"]["application/json"]["schema"])
    delete_schema = operation(contract, "/allocations/{name}/usage", "delete")["requestBody"]
    delete_v = validator(contract, delete_schema["content"]["application/json"]["schema"])
    for body in posts:
        assert errors_of(post_v, body) == []
    assert errors_of(delete_v, deletes[0]) == []


def test_the_contract_validator_is_not_vacuous(contract: Mapping[str, Any]) -> None:
    v = component(contract, "PostUsageEventInput")
    assert errors_of(v, dict(BODIES[0], extra=1))
    assert errors_of(v, dict(BODIES[0], quantity="1"))
    assert errors_of(v, dict(BODIES[0], startedAt="yesterday"))
    assert errors_of(v, {k: v for k, v in BODIES[0].items() if k != "sku"})


# --- answers the emulator gives ----------------------------------------------------------------

EVENT = {
    "sku": "CPU_HOUR",
    "quantity": 2.5,
    "startedAt": "2026-02-01T00:00:00Z",
    "endedAt": "2026-02-01T01:00:00Z",
    "user": "alice",
    "metadata": {"eventKey": "st1:k1", "jobId": "7"},
}

USAGE, ALLOC, SKUS, RULES = (
    "/allocations/{name}/usage",
    "/allocations/{name}",
    "/units/{unit}/skus",
    "/units/{unit}/skus/{sku}/rules",
)
JSON, PROBLEM = "application/json", "application/problem+json"
# (method, path under the organization, body, Accept, expected status, contract path)
ANSWERS: list[tuple[str, str, Optional[dict[str, Any]], str, int, str]] = [
    ("POST", "/allocations/physics/usage", EVENT, JSON, 200, USAGE),
    ("GET", "/allocations/physics/usage?metadata=k1", None, JSON, 200, USAGE),
    ("GET", "/allocations/physics/usage?page=9", None, JSON, 200, USAGE),
    ("DELETE", "/allocations/physics/usage", {"ids": ["nope"]}, JSON, 200, USAGE),
    ("GET", "/allocations/physics", None, JSON, 200, ALLOC),
    ("GET", "/allocations/gpu-lab", None, JSON, 200, ALLOC),
    ("GET", "/units", None, JSON, 200, "/units"),
    ("GET", "/units/credits/skus", None, JSON, 200, SKUS),
    ("GET", "/units/credits/skus?includeArchived=true", None, JSON, 200, SKUS),
    ("GET", "/units/credits/skus/CPU_HOUR/rules", None, JSON, 200, RULES),
    ("GET", "/units/credits/skus/MEM_GB_HOUR/rules", None, JSON, 200, RULES),
    ("GET", "/allocations/unknown", None, JSON, 404, ALLOC),
    ("POST", "/allocations/unknown/usage", EVENT, JSON, 404, USAGE),
    ("POST", "/allocations/physics/usage", dict(EVENT, sku="NOPE"), JSON, 404, USAGE),
    ("POST", "/allocations/physics/usage", dict(EVENT, quantity="x"), JSON, 400, USAGE),
    ("POST", "/allocations/physics/usage", dict(EVENT, quantity="x"), PROBLEM, 400, USAGE),
    ("GET", "/allocations/physics/usage?page=0", None, JSON, 400, USAGE),
    ("GET", "/units/nope/skus", None, PROBLEM, 404, SKUS),
]  # fmt: skip


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.mark.parametrize(("method", "path", "body", "accept", "status", "spec_path"), ANSWERS)
def test_emulator_answers_validate(
    contract: Mapping[str, Any],
    emulator: Emulator,
    method: str,
    path: str,
    body: Optional[dict[str, Any]],
    accept: str,
    status: int,
    spec_path: str,
) -> None:
    if method != "POST":  # make sure lists have items to check
        requests.post(
            f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}/allocations/physics/usage",
            json=EVENT,
            auth=(DEFAULT_API_KEY, ""),
            timeout=5,
        ).raise_for_status()
    resp = requests.request(
        method,
        f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}{path}",
        json=body,
        headers={"Accept": accept},
        auth=(DEFAULT_API_KEY, ""),
        timeout=5,
    )
    assert resp.status_code == status, resp.text
    content_type = resp.headers["Content-Type"]
    assert content_type == (accept if status >= 400 else "application/json")
    schema = response_schema(contract, spec_path, method.lower(), status, content_type)
    payload = resp.json()
    assert errors_of(validator(contract, schema), payload) == []
    if isinstance(payload, dict) and isinstance(payload.get("items"), list):
        assert payload["items"] or "page=9" in path


def test_unauthorised_answer_validates(contract: Mapping[str, Any], emulator: Emulator) -> None:
    resp = requests.get(
        f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}/units",
        auth=("wrong", ""),
        timeout=5,
    )
    assert resp.status_code == 401
    assert errors_of(component(contract, "Error"), resp.json()) == []


def test_injected_fault_answers_validate(contract: Mapping[str, Any], emulator: Emulator) -> None:
    emulator.add_fault({"kind": "status", "status": 503, "retryAfter": "1"})
    resp = requests.get(
        f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}/units",
        auth=(DEFAULT_API_KEY, ""),
        timeout=5,
    )
    assert resp.status_code == 503
    assert errors_of(component(contract, "Error"), resp.json()) == []


# --- our schemas say what the contract says ----------------------------------------------------


def resolve(contract: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = contract
        for part in ref[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def shape(schema: Mapping[str, Any], contract: Optional[Mapping[str, Any]] = None) -> Any:
    """What both sides must agree on: types, required, property names (recursively),
    additionalProperties, items, enum, string formats and bounds."""
    if contract is not None:
        schema = resolve(contract, schema)
    types = schema.get("type")
    out: dict[str, Any] = {
        "type": sorted([types] if isinstance(types, str) else types or []),
    }
    if "string" in out["type"] and "format" in schema:
        out["format"] = schema["format"]
    for key in ("minLength", "maxLength", "minimum"):
        if key in schema:
            out[key] = schema[key]
    if "enum" in schema:
        out["enum"] = sorted(schema["enum"])
    if "object" in out["type"]:
        out["required"] = sorted(schema.get("required", []))
        out["properties"] = {
            name: shape(sub, contract) for name, sub in schema.get("properties", {}).items()
        }
        extra = schema.get("additionalProperties", True)
        out["additionalProperties"] = (
            "any" if extra in (True, {}) else False if extra is False else shape(extra, contract)
        )
    if "items" in schema:
        out["items"] = shape(schema["items"], contract)
    return out


@pytest.mark.parametrize("name", sorted(ours.CONTRACT_NAMES))
def test_our_schema_says_what_the_contract_says(contract: Mapping[str, Any], name: str) -> None:
    theirs = contract["components"]["schemas"][name]
    assert shape(ours.CONTRACT_NAMES[name]) == shape(theirs, contract)


def referenced_schemas(contract: Mapping[str, Any], node: object, seen: set[str]) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                referenced_schemas(contract, contract["components"]["schemas"][name], seen)
        for value in node.values():
            referenced_schemas(contract, value, seen)
    elif isinstance(node, list):
        for value in node:
            referenced_schemas(contract, value, seen)
    return seen


def test_every_schema_of_the_operations_we_use_has_ours(contract: Mapping[str, Any]) -> None:
    used: set[str] = set()
    for path, method in USED_OPERATIONS:
        referenced_schemas(contract, operation(contract, path, method), used)
    referenced_schemas(contract, contract["components"]["responses"]["Problem"], used)
    assert used == set(ours.CONTRACT_NAMES)


def test_the_shape_comparison_notices_a_change(contract: Mapping[str, Any]) -> None:
    theirs = contract["components"]["schemas"]["PostUsageEventInput"]
    mine = json.loads(json.dumps(ours.POST_USAGE_EVENT_INPUT))
    mine["properties"]["user"] = {"type": "integer"}
    assert shape(mine) != shape(theirs, contract)
    mine = json.loads(json.dumps(ours.POST_USAGE_EVENT_INPUT))
    mine["additionalProperties"] = {}
    assert shape(mine) != shape(theirs, contract)


# --- both validators agree on request bodies ---------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["2026-03-01T00:00:00Z", "2026-03-01T00:00:00+01:00", "2026-13-01T00:00:00Z"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_fields = ["sku", "quantity", "startedAt", "endedAt", "user", "metadata", "extra"]
_valid_bodies = st.fixed_dictionaries(
    {
        "sku": st.text(max_size=8),
        "quantity": st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
        "startedAt": st.sampled_from(["2026-03-01T00:00:00Z", "2026-03-01T00:00:00.5+01:00"]),
        "endedAt": st.sampled_from(["2026-03-01T01:00:00Z"]),
    },
    optional={
        "user": st.text(max_size=5),
        "metadata": st.dictionaries(st.text(max_size=3), _values, max_size=3),
    },
)


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Valid bodies, and valid bodies with fields dropped, retyped or added."""
    body = dict(draw(_valid_bodies))
    if draw(st.booleans()):
        for name in draw(st.sets(st.sampled_from(_fields), max_size=2)):
            body.pop(name, None)
        body.update(draw(st.dictionaries(st.sampled_from(_fields), _values, max_size=2)))
    return body


@settings(max_examples=200, deadline=None)
@given(body=_bodies())
def test_our_validator_agrees_with_the_contract(contract: Mapping[str, Any], body: Any) -> None:
    theirs = not errors_of(component(contract, "PostUsageEventInput"), body)
    mine = not ours.validate(body, ours.POST_USAGE_EVENT_INPUT)
    assert mine == theirs


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"quantity": True},
        {"quantity": "1"},
        {"quantity": None},
        {"quantity": 0},
        {"quantity": -1.25},
        {"sku": 1},
        {"sku": None},
        {"user": None},
        {"metadata": []},
        {"metadata": None},
        {"metadata": {"k": {"deep": [1, None]}}},
        {"startedAt": "2026-03-01"},
        {"extra": 1},
        {"id": "x"},
    ],
)
@pytest.mark.parametrize("drop", [None, "sku", "quantity", "startedAt", "endedAt", "user"])
def test_our_validator_agrees_on_a_table(
    contract: Mapping[str, Any], changes: dict[str, Any], drop: Optional[str]
) -> None:
    body = {**BODIES[0], "user": "alice", **changes}
    if drop is not None:
        body.pop(drop)
    theirs = errors_of(component(contract, "PostUsageEventInput"), body)
    mine = ours.validate(body, ours.POST_USAGE_EVENT_INPUT)
    assert (mine == []) == (theirs == []), (mine, theirs)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("2026-03-01T00:00:00Z", True),
        ("2026-03-01t00:00:00z", True),
        ("2026-03-01T00:00:00.123456789+05:30", True),
        ("2016-12-31T23:59:60Z", True),
        ("2026-03-01T00:00:00", False),  # no offset
        ("2026-03-01 00:00:00Z", False),
        ("2026-02-30T00:00:00Z", False),
        ("2026-03-01T24:00:00Z", False),
        ("20260301T000000Z", False),
        ("", False),
    ],
)
def test_rfc3339_check(text: str, valid: bool) -> None:
    assert ours.is_rfc3339(text) is valid
