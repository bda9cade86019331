"""The client and the emulator against the Allocations API contract (OpenAPI 3.1).

- every request body and query the client sends validates against the contract's request
  schemas and query parameters;
- every emulator answer the client reads validates against the contract's response schemas;
- the emulator's list filters are the contract's (read from the parameters' descriptions) and
  select what those descriptions say, bounds inclusive; its pages cover every event once;
- the emulator's own schemas (tests/emulator/schemas.py) say the same as the contract, so this
  fails when either side changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from slurm_tracker.api import AllocationsClient
from slurm_tracker.delivery import deliver
from tests.conftest import need_shared
from tests.emulator import DEFAULT_API_KEY, DEFAULT_ORGANIZATION, Emulator
from tests.emulator import schemas as ours
from tests.emulator.filters import FILTERS

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
#: ... and those only the emulator serves (tests and operators may use them).
EMULATED_OPERATIONS = [*USED_OPERATIONS, ("/allocations/{name}/usage/all", "delete")]


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
    """(method, JSON body) of every request the client makes, answered plausibly; a GET's
    "body" is its query (name -> list of values)."""
    sent: list[tuple[str, Any]] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.method == "GET":
            query = parse_qs(urlsplit(request.url or "").query, keep_blank_values=True)
            sent.append(("GET", query))
        else:
            sent.append((str(request.method), json.loads(request.body) if request.body else None))
        if request.method == "POST":
            return 200, {}, json.dumps({"id": "ue-1"})
        if request.method == "DELETE":
            return 200, {}, json.dumps({"deleted": 1})
        return 200, {}, json.dumps({"items": [], "total": 0, "page": 1, "totalPages": 0})

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
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
    client.delete_usage("physics", [f"rc-{n}" for n in range(250)])

    posts = [body for method, body in captured if method == "POST"]
    deletes = [body for method, body in captured if method == "DELETE"]
    assert len(posts) == 2 * len(BODIES) and len(deletes) == 4
    post_schema = operation(contract, "/allocations/{name}/usage", "post")["requestBody"]
    post_v = validator(contract, post_schema["content"]["application/json"]["schema"])
    delete_schema = operation(contract, "/allocations/{name}/usage", "delete")["requestBody"]
    delete_v = validator(contract, delete_schema["content"]["application/json"]["schema"])
    for body in posts:
        assert errors_of(post_v, body) == []
    for body in deletes:
        assert errors_of(delete_v, body) == []
        assert 1 <= len(body["ids"]) <= 100


def query_problems(
    contract: Mapping[str, Any], path: str, method: str, query: Mapping[str, list[str]]
) -> list[str]:
    """How a query breaks the operation's query parameters: unknown names, repeated names,
    values that do not read as the parameter's type; date-times must be RFC 3339 in UTC."""
    params = {
        p["name"]: p for p in operation(contract, path, method)["parameters"] if p["in"] == "query"
    }
    problems = []
    for name, values in query.items():
        spec = params.get(name)
        if spec is None:
            problems.append(f"{name}: not a query parameter of {method.upper()} {path}")
            continue
        if len(values) != 1:
            problems.append(f"{name}: sent {len(values)} times")
        text = values[0]
        kind = spec["schema"]["type"]
        if kind == "integer" and not re.fullmatch(r"-?\d+", text):
            problems.append(f"{name}: {text!r} is not an integer")
        elif kind == "number" and not re.fullmatch(r"-?\d+(\.\d+)?([eE][+-]?\d+)?", text):
            problems.append(f"{name}: {text!r} is not a number")
        elif kind == "integer" and int(text) < 1 and name in ("page", "pageSize"):
            problems.append(f"{name}: {text} is below 1 (pages are 1-indexed)")
        if "datetime" in spec.get("description", "") and not (
            ours.is_rfc3339(text) and text.endswith("Z")
        ):
            problems.append(f"{name}: {text!r} is not an RFC 3339 date-time in UTC")
    return problems


def test_every_query_the_client_sends_validates(
    contract: Mapping[str, Any], captured: list[tuple[str, Any]]
) -> None:
    client = AllocationsClient("https://api.example.test", "acme", "pwt_x.y", sleep=lambda s: None)
    at = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=-5)))
    list(
        client.iter_usage(
            "physics",
            metadata="st1:box:",
            started_from=at,
            started_to=at + timedelta(days=1),
            ended_from=at,
            ended_to=at + timedelta(microseconds=1),
            created_from=at,
            created_to=at,
            page_size=250,
        )
    )
    list(client.iter_usage("physics"))
    client.find_usage("physics", 'st1:"odd" key')
    deliver(
        client,
        "physics",
        BODIES[1],
        "k",
        outcome_unknown_before=True,
        before_attempt=lambda n: None,
    )

    gets = [query for method, query in captured if method == "GET"]
    assert len(gets) == 4
    assert set(gets[0]) == {
        "metadata",
        "startedAtFrom",
        "startedAtTo",
        "endedAtFrom",
        "endedAtTo",
        "createdAtFrom",
        "createdAtTo",
        "page",
        "pageSize",
    }
    assert gets[0]["startedAtFrom"] == ["2026-03-01T17:30:00Z"]
    for query in gets:
        assert query_problems(contract, "/allocations/{name}/usage", "get", query) == []


@pytest.mark.parametrize(
    "query",
    [
        {"startedFrom": ["2026-03-01T00:00:00Z"]},
        {"page": ["one"]},
        {"page": ["0"]},
        {"pageSize": ["1.5"]},
        {"quantityMin": ["abc"]},
        {"startedAtFrom": ["2026-03-01T00:00:00"]},
        {"createdAtTo": ["2026-03-01T00:00:00+01:00"]},
        {"metadata": ["a", "b"]},
    ],
)
def test_the_query_check_is_not_vacuous(
    contract: Mapping[str, Any], query: dict[str, list[str]]
) -> None:
    assert query_problems(contract, "/allocations/{name}/usage", "get", query)


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

USAGE, USAGE_ALL, ALLOC, SKUS, RULES = (
    "/allocations/{name}/usage",
    "/allocations/{name}/usage/all",
    "/allocations/{name}",
    "/units/{unit}/skus",
    "/units/{unit}/skus/{sku}/rules",
)
JSON, PROBLEM = "application/json", "application/problem+json"
#: Every filter of the list, each selecting EVENT.
EVERY_FILTER = (
    "startedAtFrom=2026-02-01T00:00:00Z&startedAtTo=2026-02-01T01:00:00%2B01:00"
    "&endedAtFrom=2026-02-01T01:00:00Z&endedAtTo=2026-02-01T01:00:00Z"
    "&createdAtFrom=2020-01-01T00:00:00Z&createdAtTo=2999-01-01T00:00:00Z"
    "&quantityMin=2.5&quantityMax=2.5&unitRateMin=0.05&unitRateMax=0.05"
    "&amountMin=0.1875&amountMax=0.1875&type=COMPUTE&subtype=corehour&metadata=ST1:K1"
)
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
    ("GET", "/allocations/physics/usage?" + EVERY_FILTER, None, JSON, 200, USAGE),
    ("GET", "/allocations/physics/usage?pageSize=1000", None, JSON, 200, USAGE),
    ("GET", "/allocations/physics/usage?startedAtFrom=yesterday", None, JSON, 400, USAGE),
    ("GET", "/allocations/physics/usage?amountMax=lots", None, PROBLEM, 400, USAGE),
    ("GET", "/allocations/unknown/usage", None, JSON, 404, USAGE),
    ("DELETE", "/allocations/physics/usage", {"ids": None}, JSON, 200, USAGE),
    ("DELETE", "/allocations/physics/usage", {"id": ["x"]}, JSON, 400, USAGE),
    ("DELETE", "/allocations/physics/usage/all?" + EVERY_FILTER, None, JSON, 200, USAGE_ALL),
    ("DELETE", "/allocations/physics/usage/all?metadata=no-such", None, JSON, 200, USAGE_ALL),
    ("DELETE", "/allocations/physics/usage/all?quantityMin=x", None, JSON, 400, USAGE_ALL),
    ("DELETE", "/allocations/unknown/usage/all", None, PROBLEM, 404, USAGE_ALL),
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
    if method == "DELETE" and path.endswith(EVERY_FILTER):
        assert payload["deleted"] >= 1  # the filters select EVENT


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
    for path, method in EMULATED_OPERATIONS:
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


# --- the list filters and pages of the emulator are the contract's ----------------------------

FILTERED = {"list": (USAGE, "get"), "delete all": (USAGE_ALL, "delete")}
_DESCRIPTION = re.compile(r"Filter: (\w+) (>=|<=|contains) this (\w+)")


def contract_filters(contract: Mapping[str, Any], path: str, method: str) -> dict[str, Any]:
    """parameter -> (column, operator, schema type), read from the descriptions."""
    out = {}
    for param in operation(contract, path, method)["parameters"]:
        if param["in"] != "query" or param["name"] in ("page", "pageSize"):
            continue
        match = _DESCRIPTION.match(param["description"])
        assert match is not None, param["description"]
        column, operator, _ = match.groups()
        if operator == "contains":
            assert "case-insensitive" in param["description"]
        out[param["name"]] = (column, operator, param["schema"]["type"])
    return out


@pytest.mark.parametrize("which", sorted(FILTERED))
def test_the_emulator_filters_are_the_contracts(contract: Mapping[str, Any], which: str) -> None:
    kinds = {"time": "string", "text": "string", "json": "string", "number": "number"}
    ours_ = {f.parameter: (f.column, f.operator, kinds[f.kind]) for f in FILTERS}
    assert ours_ == contract_filters(contract, *FILTERED[which])
    times = [f.parameter for f in FILTERS if f.kind == "time"]
    params = operation(contract, *FILTERED[which])["parameters"]
    assert times == [p["name"] for p in params if "datetime" in p["description"]]


def camel(column: str) -> str:
    head, *rest = column.split("_")
    return head + "".join(word.title() for word in rest)


#: A catalog where every filtered field varies: two types, three subtypes, a unit rate that
#: changes on 2026-02-15.
FILTER_CATALOG: dict[str, Any] = {
    "allocations": {"physics": "credits", "chemistry": "credits"},
    "units": {
        "credits": {
            "ratedInUsd": True,
            "rules": [
                {
                    "effectiveFrom": "2020-01-01T00:00:00Z",
                    "effectiveTo": "2026-02-15T00:00:00Z",
                    "rate": "0.05",
                },
                {"effectiveFrom": "2026-02-15T00:00:00Z", "effectiveTo": None, "rate": "0.04"},
            ],
        }
    },
    "skus": {
        "credits": {
            "CPU": {"type": "Compute", "subtype": "CoreHour"},
            "GPU": {
                "type": "Compute",
                "subtype": "GpuHour",
                "rules": [{"effectiveFrom": "2020-01-01T00:00:00Z", "rate": "20"}],
            },
            "DISK": {
                "type": "Storage",
                "subtype": "GbMonth",
                "rules": [{"effectiveFrom": "2020-01-01T00:00:00Z", "rate": "0.5"}],
            },
        }
    },
}

# (sku, quantity, startedAt, endedAt, createdAt, metadata)
FILTER_EVENTS: list[tuple[str, Any, str, str, str, dict[str, Any]]] = [
    ("CPU", 1, "2026-02-01T00:00:00Z", "2026-02-01T01:00:00Z", "2026-03-01T00:00:00Z",
     {"jobId": "JOB-7", "cluster": "box"}),
    ("CPU", 2.5, "2026-02-01T02:00:00+02:00", "2026-02-01T03:00:00+02:00",
     "2026-03-01T00:00:00Z", {"jobId": "job-8", "note": "Ünïcode"}),
    ("GPU", 0.25, "2026-02-14T23:59:59.999Z", "2026-02-15T00:30:00Z", "2026-03-01T00:00:01Z",
     {"jobId": "9", "cluster": "BOX"}),
    ("GPU", 4, "2026-02-15T00:00:00Z", "2026-02-15T04:00:00Z", "2026-03-02T12:00:00Z",
     {"jobId": "10", "nested": {"cluster": "box-2"}}),
    ("DISK", 100, "2026-02-20T00:00:00-05:00", "2026-02-21T00:00:00-05:00",
     "2026-03-02T12:00:00.5Z", {}),
    ("DISK", 0.1, "2026-02-28T00:00:00Z", "2026-02-28T00:00:00Z", "2026-03-03T00:00:00Z",
     {"jobId": "11", "tags": ["Box", 1.5]}),
    ("CPU", 1000000, "2026-03-01T00:00:00Z", "2026-03-31T00:00:00Z", "2026-03-31T23:59:59Z",
     {"jobId": "12"}),
]  # fmt: skip


def load_filter_events(emulator: Emulator) -> None:
    """FILTER_EVENTS in physics, each also in chemistry (never listed from physics)."""
    for n, (sku, quantity, started, ended, created, meta) in enumerate(FILTER_EVENTS):
        emulator.set_now(ours.parse_rfc3339(created))
        for allocation in ("physics", "chemistry"):
            body = {"sku": sku, "quantity": quantity, "startedAt": started, "endedAt": ended}
            body["metadata"] = {**meta, "eventKey": f"{allocation}:{n}"}
            requests.post(
                f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}"
                f"/allocations/{allocation}/usage",
                json=body,
                auth=(DEFAULT_API_KEY, ""),
                timeout=5,
            ).raise_for_status()
    emulator.set_now(None)


def usage(emulator: Emulator, method: str, path: str, query: Mapping[str, Any]) -> Any:
    resp = requests.request(
        method,
        f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}/allocations/physics{path}",
        params=query,
        auth=(DEFAULT_API_KEY, ""),
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def listed(emulator: Emulator, query: Mapping[str, Any]) -> list[str]:
    answer = usage(emulator, "GET", "/usage", {**query, "pageSize": 100})
    assert answer["total"] == len(answer["items"])
    return [item["metadata"]["eventKey"] for item in answer["items"]]


def selects(item: Mapping[str, Any], column: str, operator: str, kind: str, text: str) -> bool:
    """What the contract's description says: ``<column> <operator> this <value>``."""
    stored = item[camel(column)]
    if operator == "contains":
        haystack = stored if isinstance(stored, str) else json.dumps(stored, ensure_ascii=False)
        return text.lower() in haystack.lower()
    left: Any
    right: Any
    if kind == "string":  # a date-time, compared as an instant
        left, right = ours.parse_rfc3339(stored), ours.parse_rfc3339(text)
    else:
        left, right = Decimal(str(stored)), Decimal(text)
    return bool(left >= right) if operator == ">=" else bool(left <= right)


def candidates(items: list[dict[str, Any]], column: str, kind: str, operator: str) -> list[str]:
    """Every stored value (so each bound is tried exactly at a stored value), written
    differently, and just beside it."""
    values: list[str] = []
    for item in items:
        stored = item[camel(column)]
        if operator == "contains":
            if isinstance(stored, str):
                values += [stored, stored.upper(), stored[1:-1], "no-such-thing"]
            else:  # the metadata object
                values += ["box", "BOX", "ox-", "ÜNÏCODE", '"jobId": "1', "no-such-thing"]
        elif kind == "string":
            at = ours.parse_rfc3339(stored)
            tick = timedelta(milliseconds=1)
            plus1 = timezone(timedelta(hours=1))
            values += [stored, at.astimezone(plus1).isoformat()]
            values += [(at - tick).isoformat(), (at + tick).isoformat()]
        else:
            number = Decimal(str(stored))
            values += [str(stored), str(number - Decimal("0.001")), str(number + Decimal("0.001"))]
    return values


@pytest.fixture(scope="module")
def filtered_emulator() -> Iterator[Emulator]:
    with Emulator(FILTER_CATALOG) as emu:
        load_filter_events(emu)
        yield emu


def physics_items(emulator: Emulator) -> list[dict[str, Any]]:
    return list(usage(emulator, "GET", "/usage", {"pageSize": 100})["items"])


@pytest.mark.parametrize("spec", FILTERS, ids=[f.parameter for f in FILTERS])
def test_each_list_filter_selects_what_the_contract_says(
    contract: Mapping[str, Any], filtered_emulator: Emulator, spec: Any
) -> None:
    column, operator, kind = contract_filters(contract, USAGE, "get")[spec.parameter]
    items = physics_items(filtered_emulator)
    assert len(items) == len(FILTER_EVENTS)
    sizes = set()
    for text in candidates(items, column, kind, operator):
        expected = [
            i["metadata"]["eventKey"] for i in items if selects(i, column, operator, kind, text)
        ]
        got = listed(filtered_emulator, {spec.parameter: text})
        assert got == expected, (spec.parameter, text)
        sizes.add(len(got))
    # the filter does something: it keeps some events and drops others
    assert sizes - {0, len(items)}, sizes


@pytest.mark.parametrize(
    "spec", [f for f in FILTERS if f.operator != "contains"], ids=lambda f: f.parameter
)
def test_each_bound_is_inclusive(filtered_emulator: Emulator, spec: Any) -> None:
    items = physics_items(filtered_emulator)
    field = camel(spec.column)
    read: Any = ours.parse_rfc3339 if spec.kind == "time" else Decimal
    values = [read(str(i[field])) for i in items]
    # the largest value for a lower bound, the smallest for an upper one: only the events at
    # exactly that value are selected
    extreme = max(values) if spec.operator == ">=" else min(values)
    text = str(items[values.index(extreme)][field])
    at_bound = [i["metadata"]["eventKey"] for i, v in zip(items, values) if v == extreme]
    assert 0 < len(at_bound) < len(items)
    assert listed(filtered_emulator, {spec.parameter: text}) == at_bound


def test_filters_combine_and_page_together(filtered_emulator: Emulator) -> None:
    query = {"type": "compute", "quantityMin": "1", "startedAtTo": "2026-02-15T00:00:00Z"}
    assert listed(filtered_emulator, query) == ["physics:0", "physics:1", "physics:3"]
    first = usage(filtered_emulator, "GET", "/usage", {**query, "pageSize": 2})
    second = usage(filtered_emulator, "GET", "/usage", {**query, "pageSize": 2, "page": 2})
    assert (first["total"], first["totalPages"], second["page"]) == (3, 2, 2)
    assert [i["metadata"]["eventKey"] for i in first["items"] + second["items"]] == [
        "physics:0",
        "physics:1",
        "physics:3",
    ]


def test_items_are_ordered_by_creation_time_then_arrival() -> None:
    with Emulator() as emulator:
        client = AllocationsClient(
            emulator.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY, sleep=lambda s: None
        )
        # arrival order differs from creation time (a clock set back, events restored, ...)
        for key, created in [
            ("a", "2026-03-02T00:00:00Z"),
            ("b", "2026-03-01T00:00:00Z"),
            ("c", "2026-03-03T00:00:00Z"),
            ("d", "2026-03-01T01:00:00+01:00"),  # the same instant as b
        ]:
            emulator.set_now(ours.parse_rfc3339(created))
            client.post_usage("physics", dict(EVENT, metadata={"eventKey": key}))
        expected = ["b", "d", "a", "c"]
        assert listed(emulator, {}) == expected
        assert [i["metadata"]["eventKey"] for i in client.iter_usage("physics", page_size=1)] == (
            expected
        )
        assert [i["createdAt"] for i in physics_items(emulator)][:2] == [
            "2026-03-01T00:00:00.000Z"
        ] * 2


@pytest.mark.parametrize("spec", FILTERS, ids=[f.parameter for f in FILTERS])
def test_delete_all_deletes_what_the_same_filter_lists(
    contract: Mapping[str, Any], spec: Any
) -> None:
    column, operator, kind = contract_filters(contract, USAGE_ALL, "delete")[spec.parameter]
    with Emulator(FILTER_CATALOG) as emulator:
        load_filter_events(emulator)
        items = physics_items(emulator)
        values = candidates(items, column, kind, operator)
        text = next(
            v
            for v in values
            if 0 < sum(selects(i, column, operator, kind, v) for i in items) < len(items)
        )
        doomed = listed(emulator, {spec.parameter: text})

        answer = usage(emulator, "DELETE", "/usage/all", {spec.parameter: text})

        assert answer == {"deleted": len(doomed)}
        kept = [i["metadata"]["eventKey"] for i in items]
        assert listed(emulator, {}) == [k for k in kept if k not in doomed]
        assert len([e for e in emulator.events() if e.allocation == "chemistry"]) == len(items)


def test_delete_all_without_filters_deletes_the_allocations_events() -> None:
    with Emulator(FILTER_CATALOG) as emulator:
        load_filter_events(emulator)
        assert usage(emulator, "DELETE", "/usage/all", {}) == {"deleted": len(FILTER_EVENTS)}
        assert listed(emulator, {}) == []
        assert {e.allocation for e in emulator.events()} == {"chemistry"}
        assert usage(emulator, "DELETE", "/usage/all", {}) == {"deleted": 0}


def test_delete_by_ids_counts_only_the_ids_that_existed() -> None:
    with Emulator(FILTER_CATALOG) as emulator:
        load_filter_events(emulator)
        ids = [i["id"] for i in physics_items(emulator)]
        other = next(e.id for e in emulator.events() if e.allocation == "chemistry")
        client = AllocationsClient(
            emulator.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY, sleep=lambda s: None
        )
        assert client.delete_usage("physics", [ids[0], ids[0], "nope", other, ids[2]]) == 2
        assert client.delete_usage("physics", [ids[0]]) == 0  # already gone: harmless
        assert len(physics_items(emulator)) == len(ids) - 2
        assert other in {e.id for e in emulator.events()}  # another allocation's id


def test_list_filter_errors_name_every_bad_parameter(contract: Mapping[str, Any]) -> None:
    with Emulator() as emulator:
        resp = requests.get(
            f"{emulator.base_url}/api/organizations/{DEFAULT_ORGANIZATION}"
            "/allocations/physics/usage",
            params={"startedAtTo": "2026-03-01", "quantityMin": "NaN", "amountMax": "1e3"},
            auth=(DEFAULT_API_KEY, ""),
            timeout=5,
        )
    assert resp.status_code == 400
    body = resp.json()
    assert errors_of(component(contract, "Error"), body) == []
    assert [line.split(":")[0] for line in body["errors"]] == ["startedAtTo", "quantityMin"]


def test_pages_cover_every_event_once(contract: Mapping[str, Any]) -> None:
    page_v = component(contract, "RatedCostsPaginatedResponse")
    with Emulator() as emulator:
        client = AllocationsClient(
            emulator.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY, sleep=lambda s: None
        )
        for n in range(250):
            client.post_usage("physics", dict(EVENT, metadata={"eventKey": f"st1:{n}"}))

        pages = [
            usage(emulator, "GET", "/usage", {"page": n, "pageSize": 100}) for n in (1, 2, 3, 4)
        ]
        default = usage(emulator, "GET", "/usage", {})
        before = len(emulator.requests())
        walked = [i["metadata"]["eventKey"] for i in client.iter_usage("physics", page_size=100)]
        gets = [r["query"] for r in emulator.requests()[before:]]

    for answer in [*pages, default]:
        assert errors_of(page_v, answer) == []
    assert [len(p["items"]) for p in pages] == [100, 100, 50, 0]
    assert {(p["total"], p["pageSize"], p["totalPages"]) for p in pages} == {(250, 100, 3)}
    assert [p["page"] for p in pages] == [1, 2, 3, 4]
    keys = [i["metadata"]["eventKey"] for p in pages for i in p["items"]]
    assert keys == [f"st1:{n}" for n in range(250)]
    assert walked == keys
    assert [q["page"] for q in gets] == ["1", "2", "3"]
    # the contract's defaults: page 1, 50 per page
    assert (default["page"], default["pageSize"], default["totalPages"]) == (1, 50, 5)
    assert [i["metadata"]["eventKey"] for i in default["items"]] == keys[:50]
