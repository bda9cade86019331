"""The emulator over real HTTP, through the real client: endpoints, rating, faults, and the
exactly-once delivery through those faults."""

from __future__ import annotations

import itertools
import json
import socket
import urllib.error
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

from slurm_tracker import errors
from slurm_tracker.api import (
    AllocationsClient,
    DeliveryFailed,
    FatalApiError,
    NotSent,
    OutcomeUnknown,
    RateLimited,
)
from slurm_tracker.delivery import Delivery, deliver
from tests.emulator import (
    DEFAULT_API_KEY,
    DEFAULT_ORGANIZATION,
    AdminClient,
    Emulator,
    EmulatorProcess,
    Fault,
)

USAGE_PATH = f"/api/organizations/{DEFAULT_ORGANIZATION}/allocations/physics/usage"


def body(key: str, **changes: Any) -> dict[str, Any]:
    event = {
        "sku": "CPU_HOUR",
        "quantity": 2.5,
        "startedAt": "2026-02-01T00:00:00Z",
        "endedAt": "2026-02-01T01:00:00Z",
        "user": "alice",
        "metadata": {"eventKey": key, "jobId": "42"},
    }
    event.update(changes)
    return event


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[Emulator]:
    with Emulator(clock=clock) as emulator:
        yield emulator


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(
    emulator: Emulator, sleeps: list[float], read_timeout_s: float = 5, **kwargs: Any
) -> AllocationsClient:
    return AllocationsClient(
        emulator.base_url,
        DEFAULT_ORGANIZATION,
        DEFAULT_API_KEY,
        connect_timeout_s=2,
        read_timeout_s=read_timeout_s,
        sleep=sleeps.append,
        **kwargs,
    )


@pytest.fixture
def client(emu: Emulator, sleeps: list[float]) -> AllocationsClient:
    return make_client(emu, sleeps)


def send(client: AllocationsClient, key: str, unknown_before: bool = False) -> Delivery:
    return deliver(
        client,
        "physics",
        body(key),
        key,
        outcome_unknown_before=unknown_before,
        before_attempt=lambda n: None,
    )


def keys(emulator: Emulator) -> list[Optional[str]]:
    return [e.event_key for e in emulator.events()]


def api_calls(emulator: Emulator) -> list[str]:
    return [f"{r['method']} {r['status']}" for r in emulator.requests()]


# --- endpoints ---------------------------------------------------------------------------------


def test_create_list_filter_delete(emu: Emulator, client: AllocationsClient) -> None:
    created = client.post_usage("physics", body("st1:a:1"))
    client.post_usage("physics", body("st1:a:10"))
    client.post_usage("physics", body("st1:b:2", metadata={"eventKey": "st1:b:2", "jobId": "7"}))
    assert created["allocation"] == "physics" and created["organization"] == DEFAULT_ORGANIZATION

    found = client.find_usage("physics", "st1:a:1")
    assert found is not None
    assert found["usageEventId"] == created["id"]
    assert found["metadata"] == {"eventKey": "st1:a:1", "jobId": "42"}
    assert client.find_usage("physics", "st1:a") is None  # substring hits, no exact match
    assert client.find_usage("chemistry", "st1:a:1") is None  # other allocation

    def total(query: str) -> int:
        resp = requests.get(
            emu.base_url + USAGE_PATH,
            params={"metadata": query},
            auth=(DEFAULT_API_KEY, ""),
            timeout=5,
        )
        return int(resp.json()["total"])

    assert total("ST1:A:1") == 2  # case-insensitive substring of the metadata JSON
    assert total('"jobId": "42"') == 2
    assert total("") == 3

    assert client.delete_usage("physics", [found["id"], "no-such-id"]) == 1
    assert keys(emu) == ["st1:a:10", "st1:b:2"]
    assert client.find_usage("physics", "st1:a:1") is None


def test_find_usage_walks_the_emulator_pages(clock: FakeClock, sleeps: list[float]) -> None:
    with Emulator(clock=clock, max_page_size=2) as emulator:
        client = make_client(emulator, sleeps)
        for key in ["st1:p:10", "st1:p:11", "st1:p:12", "st1:p:13", "st1:p:14", "st1:p:1"]:
            client.post_usage("physics", body(key))

        found = client.find_usage("physics", "st1:p:1")

        assert found is not None and found["metadata"]["eventKey"] == "st1:p:1"
        pages = [r["query"] for r in emulator.requests() if r["method"] == "GET"]
        assert pages == [
            {"metadata": "st1:p:1", "page": str(n), "pageSize": "100"} for n in (1, 2, 3)
        ]
        resp = requests.get(
            emulator.base_url + USAGE_PATH,
            params={"page": 3, "pageSize": 100},
            auth=(DEFAULT_API_KEY, ""),
            timeout=5,
        ).json()
        assert (resp["total"], resp["pageSize"], resp["totalPages"]) == (6, 2, 3)
        assert [i["metadata"]["eventKey"] for i in resp["items"]] == ["st1:p:14", "st1:p:1"]


def test_iter_usage_filters_and_pages_through_the_emulator(
    emu: Emulator, client: AllocationsClient
) -> None:
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for n in range(7):
        emu.set_now(start + timedelta(hours=n))
        client.post_usage(
            "physics",
            body(
                f"st1:box:{n}",
                startedAt=f"2026-02-0{n + 1}T00:00:00Z",
                endedAt="2026-02-09T00:00:00Z",
            ),
        )
        client.post_usage("chemistry", body(f"st1:box:{n}"))
    client.post_usage("physics", body("other-agent:1", endedAt="2026-02-10T00:00:00Z"))

    def walk(**filters: Any) -> list[Optional[str]]:
        found = client.iter_usage("physics", page_size=2, **filters)
        return [item["metadata"]["eventKey"] for item in found]

    assert walk() == [f"st1:box:{n}" for n in range(7)] + ["other-agent:1"]
    assert walk(metadata="ST1:BOX:") == [f"st1:box:{n}" for n in range(7)]
    assert walk(created_from=start + timedelta(hours=2), created_to=start + timedelta(hours=3)) == [
        "st1:box:2",
        "st1:box:3",
    ]
    plus1 = timezone(timedelta(hours=1))
    assert walk(
        started_from=datetime(2026, 2, 6, 1, tzinfo=plus1),  # 2026-02-06T00:00:00Z, inclusive
        started_to=datetime(2026, 2, 7, tzinfo=timezone.utc),
        ended_to=datetime(2026, 2, 9, tzinfo=timezone.utc),
    ) == ["st1:box:5", "st1:box:6"]
    assert walk(ended_from=datetime(2026, 2, 9, 0, 0, 0, 1000, tzinfo=timezone.utc)) == [
        "other-agent:1"
    ]
    gets = [r["query"] for r in emu.requests() if r["method"] == "GET"]
    assert gets[-1]["endedAtFrom"] == "2026-02-09T00:00:00.001000Z"
    assert [q["page"] for q in gets[:4]] == ["1", "2", "3", "4"]  # 8 events, 2 a page


def test_iter_usage_retries_a_page_through_faults(
    emu: Emulator, client: AllocationsClient, sleeps: list[float]
) -> None:
    for n in range(5):
        client.post_usage("physics", body(f"k{n}"))
    emu.add_fault(Fault("status", status=503, method="GET", times=1))
    emu.add_fault(Fault("reset", method="GET", times=1))
    found = client.iter_usage("physics", page_size=3)
    assert next(found)["metadata"]["eventKey"] == "k0"
    assert len(sleeps) == 2
    assert [i["metadata"]["eventKey"] for i in found] == ["k1", "k2", "k3", "k4"]
    assert [r["status"] for r in emu.requests() if r["method"] == "GET"] == [503, "reset", 200, 200]


def test_iter_usage_of_an_unknown_allocation_is_refused(client: AllocationsClient) -> None:
    with pytest.raises(errors.ApiError) as info:
        list(client.iter_usage("no-such-allocation"))
    assert info.value.status == 404 and "no-such-allocation" in info.value.message
    assert not isinstance(info.value, (errors.ApiUnavailable, FatalApiError))


def test_delete_usage_in_batches_through_the_emulator(
    emu: Emulator, client: AllocationsClient
) -> None:
    for n in range(230):
        client.post_usage("physics", body(f"k{n}"))
    client.post_usage("chemistry", body("keep"))
    ids = [item["id"] for item in client.iter_usage("physics")]
    assert len(ids) == 230

    assert client.delete_usage("physics", [*ids, "gone-already"]) == 230

    deletes = [r["body"]["ids"] for r in emu.requests() if r["method"] == "DELETE"]
    assert [len(d) for d in deletes] == [100, 100, 31]
    assert keys(emu) == ["keep"]
    assert client.delete_usage("physics", ids) == 0


def test_created_at_follows_the_wall_clock(clock: FakeClock) -> None:
    now = [datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)]
    with Emulator(clock=clock, wall_clock=lambda: now[0]) as emulator:
        client = make_client(emulator, [])
        assert client.post_usage("physics", body("a"))["createdAt"] == "2026-05-01T12:00:00.123Z"
        emulator.set_now(datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
        now[0] += timedelta(days=1)
        assert client.post_usage("physics", body("b"))["createdAt"] == "2026-01-01T00:00:00.000Z"
        emulator.set_now(None)
        assert client.post_usage("physics", body("c"))["createdAt"] == "2026-05-02T12:00:00.123Z"
        with pytest.raises(ValueError, match="aware"):
            emulator.set_now(datetime(2026, 1, 1))
        emulator.set_now(datetime(2020, 1, 1, tzinfo=timezone.utc))
        emulator.reset()
        assert emulator.now() == now[0]  # reset unpins the clock
        assert [e.created_at for e in emulator.events()] == []


def test_catalog_endpoints(client: AllocationsClient) -> None:
    units = {u["name"]: u for u in client.list_units()}
    assert units["credits"]["ratedInUsd"] is True
    assert units["credits"]["Rules"][0]["rate"] == 0.05
    assert "effectiveTo" not in units["credits"]["Rules"][0]  # open-ended
    codes = [s["code"] for s in client.list_skus("credits")]
    assert codes == ["CPU_HOUR", "GPU_HOUR", "MEM_GB_HOUR"]
    archived = {s["code"]: s for s in client.list_skus("credits", include_archived=True)}
    assert "deletedAt" in archived["OLD_SKU"]
    cpu = archived["CPU_HOUR"]
    assert cpu["currentRate"] == 1.5
    rules = client.list_sku_rules("credits", cpu["id"])
    assert [(r["rate"], r.get("effectiveTo")) for r in rules] == [
        (1, "2026-01-01T00:00:00Z"),
        (1.5, None),
    ]
    assert client.list_sku_rules("credits", "CPU_HOUR") == rules  # by code too
    assert client.list_sku_rules("credits", "MEM_GB_HOUR") == []
    with pytest.raises(errors.ApiError) as info:
        client.list_skus("nope")
    assert info.value.status == 404 and info.value.code == "not_found"


def test_allocations(client: AllocationsClient) -> None:
    client.post_usage("physics", body("k", quantity=10))
    physics = client.get_allocation("physics")
    assert (physics["unit"], physics["type"], physics["total"]) == ("credits", "managed", 100000)
    assert Decimal(str(physics["used"])) == Decimal("0.75")  # 10 x 1.5 x 0.05
    assert client.get_allocation("gpu-lab")["type"] == "custom"
    with pytest.raises(errors.ApiError) as info:
        client.get_allocation("no such/allocation")
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert "no such/allocation" in info.value.message


@pytest.mark.parametrize(
    ("allocation", "sku", "quantity", "started_at", "sku_rate", "unit_rate", "amount"),
    [
        ("physics", "CPU_HOUR", 2.5, "2025-06-01T00:00:00Z", "1", "0.05", "0.125"),
        ("physics", "CPU_HOUR", 2.5, "2026-02-01T00:00:00Z", "1.5", "0.05", "0.1875"),
        ("physics", "CPU_HOUR", 2.5, "2026-01-01T00:00:00Z", "1.5", "0.05", "0.1875"),
        ("physics", "CPU_HOUR", 2.5, "2025-12-31T23:59:59Z", "1", "0.05", "0.125"),
        ("physics", "CPU_HOUR", 0.1, "2026-02-01T00:00:00Z", "1.5", "0.05", "0.0075"),
        ("physics", "GPU_HOUR", 3, "2026-02-01T00:00:00Z", "20", "0.05", "3"),
        ("physics", "MEM_GB_HOUR", 10, "2026-02-01T00:00:00Z", "1", "0.05", "0.5"),
        ("gpu-lab", "GPU_HOUR", 4, "2026-02-01T00:00:00Z", "1", "1", "4"),
        ("physics", "CPU_HOUR", 1.5, "2026-02-01T02:00:00+02:00", "1.5", "0.05", "0.1125"),
    ],
)
def test_rating(
    emu: Emulator,
    client: AllocationsClient,
    allocation: str,
    sku: str,
    quantity: float,
    started_at: str,
    sku_rate: str,
    unit_rate: str,
    amount: str,
) -> None:
    client.post_usage(allocation, body("k", sku=sku, quantity=quantity, startedAt=started_at))
    (event,) = emu.events()
    assert (event.sku_rate, event.unit_rate, event.amount) == (
        Decimal(sku_rate),
        Decimal(unit_rate),
        Decimal(amount),
    )
    item = client.find_usage(allocation, "k")
    assert item is not None
    assert Decimal(str(item["amount"])) == Decimal(amount)
    assert Decimal(str(item["skuAppliedRate"])) == Decimal(sku_rate)
    assert Decimal(str(item["unitAppliedRate"])) == Decimal(unit_rate)


@pytest.mark.parametrize(
    ("changes", "status", "code", "text"),
    [
        ({"startedAt": "2019-06-01T00:00:00Z"}, 400, "no_rate", "no rate rule of SKU 'CPU_HOUR'"),
        ({"sku": "OLD_SKU"}, 404, "not_found", "SKU 'OLD_SKU' not found"),
        ({"sku": "cpu_hour"}, 404, "not_found", "SKU 'cpu_hour' not found"),
        ({"quantity": "2.5"}, 400, "invalid", "#/quantity: expected number, got string"),
        ({"quantity": True}, 400, "invalid", "#/quantity: expected number, got boolean"),
        ({"startedAt": "2026-02-01 00:00"}, 400, "invalid", "#/startedAt: must be an RFC 3339"),
        ({"account": "x"}, 400, "invalid", "#/account: unknown property"),
        ({"metadata": ["x"]}, 400, "invalid", "#/metadata: expected object"),
    ],
)
def test_refused_events(
    emu: Emulator,
    client: AllocationsClient,
    changes: dict[str, Any],
    status: int,
    code: str,
    text: str,
) -> None:
    with pytest.raises(errors.ApiError) as info:
        client.post_usage("physics", body("k", **changes))
    assert (info.value.status, info.value.code) == (status, code)
    assert text in info.value.message
    assert emu.events() == []


def test_missing_fields_are_listed_in_a_problem(emu: Emulator) -> None:
    resp = requests.post(
        emu.base_url + USAGE_PATH,
        json={"quantity": 1},
        headers={"Accept": "application/problem+json"},
        auth=(DEFAULT_API_KEY, ""),
        timeout=5,
    )
    assert resp.status_code == 400
    assert resp.headers["Content-Type"] == "application/problem+json"
    problem = resp.json()
    details = sorted(e["detail"] for e in problem["errors"])
    assert details == [
        f"required property {name!r} is missing" for name in ("endedAt", "sku", "startedAt")
    ]


def test_wrong_key_is_refused_and_requests_are_recorded(emu: Emulator, sleeps: list[float]) -> None:
    bad = AllocationsClient(emu.base_url, DEFAULT_ORGANIZATION, "pwt_eA.wrong", sleep=sleeps.append)
    with pytest.raises(FatalApiError) as info:
        bad.post_usage("physics", body("k"))
    assert info.value.status == 401
    good = make_client(emu, sleeps)
    good.post_usage("physics", body("k"))
    first, second = emu.requests()
    assert (first["method"], first["path"], first["authUser"], first["status"]) == (
        "POST",
        USAGE_PATH,
        "pwt_eA.wrong",
        401,
    )
    assert second["authUser"] == DEFAULT_API_KEY and second["status"] == 200
    assert second["body"] == body("k")
    assert keys(emu) == ["k"]


def test_other_organization_and_odd_names(emu: Emulator, sleeps: list[float]) -> None:
    other = AllocationsClient(emu.base_url, "other-org", DEFAULT_API_KEY, sleep=sleeps.append)
    with pytest.raises(errors.ApiError) as info:
        other.list_units()
    assert info.value.status == 404
    catalog = {
        "allocations": {"lab/é b?": "u"},
        "units": {"u": {"ratedInUsd": False}},
        "skus": {"u": {"S": {}}},
    }
    emu.reset(catalog)
    client = make_client(emu, sleeps)
    client.post_usage("lab/é b?", body("k", sku="S"))
    assert emu.events()[0].allocation == "lab/é b?"
    assert emu.requests()[-1]["rawPath"].endswith("/allocations/lab%2F%C3%A9%20b%3F/usage")


# --- faults, one kind at a time ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected", "stored"),
    [
        ({"kind": "status", "status": 500}, OutcomeUnknown, 0),
        ({"kind": "status", "status": 500, "commit": True}, OutcomeUnknown, 1),
        ({"kind": "status", "status": 502, "commit": True}, OutcomeUnknown, 1),
        ({"kind": "status", "status": 503}, OutcomeUnknown, 0),
        ({"kind": "status", "status": 429, "retryAfter": "2"}, RateLimited, 0),
        ({"kind": "status", "status": 400, "message": "nope"}, errors.ApiError, 0),
        ({"kind": "reset"}, OutcomeUnknown, 0),
        ({"kind": "reset", "commit": True}, OutcomeUnknown, 1),
    ],
)
def test_fault_kinds(
    emu: Emulator,
    client: AllocationsClient,
    fault: dict[str, Any],
    expected: type[Exception],
    stored: int,
) -> None:
    emu.add_fault(fault)
    with pytest.raises(errors.TrackerError) as info:
        client.post_usage("physics", body("k"))
    assert type(info.value) is expected
    assert len(emu.events()) == stored
    client.post_usage("physics", body("k2"))  # one-shot: the next request is served
    assert len(emu.events()) == stored + 1


def test_retry_after_is_sent(emu: Emulator, client: AllocationsClient) -> None:
    emu.add_fault({"kind": "status", "status": 503, "retryAfter": "3"})
    with pytest.raises(OutcomeUnknown) as info:
        client.post_usage("physics", body("k"))
    assert info.value.retry_after_s == 3.0


def test_slow_answer_after_commit(emu: Emulator, sleeps: list[float]) -> None:
    client = make_client(emu, sleeps, read_timeout_s=0.3)
    emu.add_fault(Fault("slow", delay_s=1.0, commit=True))
    with pytest.raises(OutcomeUnknown, match="read timeout"):
        client.post_usage("physics", body("k"))
    assert keys(emu) == ["k"]


def test_fault_filters(emu: Emulator, client: AllocationsClient) -> None:
    emu.add_fault({"kind": "status", "status": 400, "eventKey": "bad", "times": None})
    emu.add_fault({"kind": "status", "status": 500, "method": "GET", "path": "/units$"})
    client.post_usage("physics", body("good"))
    for _ in range(2):
        with pytest.raises(errors.ApiError):
            client.post_usage("physics", body("bad"))
    assert client.find_usage("physics", "good") is not None  # GET, but not /units
    with pytest.raises(OutcomeUnknown):
        client._request("GET", f"/api/organizations/{DEFAULT_ORGANIZATION}/units")
    assert client.list_units()  # the /units fault was one-shot
    assert keys(emu) == ["good"]
    assert [f.event_key for f in emu.faults()] == ["bad"]  # times=None stays


def test_outage_until_deadline(emu: Emulator, clock: FakeClock, client: AllocationsClient) -> None:
    emu.outage(30)
    for _ in range(2):
        with pytest.raises(OutcomeUnknown, match="Connection"):
            client.post_usage("physics", body("k"))
    clock.now += 29.9
    with pytest.raises(OutcomeUnknown):
        client._request("GET", f"/api/organizations/{DEFAULT_ORGANIZATION}/units")
    clock.now += 0.2
    client.post_usage("physics", body("k"))
    assert keys(emu) == ["k"]
    assert [r["status"] for r in emu.requests()] == ["outage", "outage", "outage", 200]


def test_connection_refused_is_not_sent(sleeps: list[float]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AllocationsClient(
        f"http://127.0.0.1:{port}", "o", DEFAULT_API_KEY, sleep=sleeps.append, max_attempts=2
    )
    with pytest.raises(NotSent, match="cannot connect"):
        client.post_usage("physics", body("k"))
    with pytest.raises(DeliveryFailed) as info:
        send(client, "k")
    assert info.value.last_outcome_unknown is False
    assert info.value.attempts == 2


# --- deliver through faults: exactly once ------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=500, commit=True),
        Fault("status", status=502, commit=True),
        Fault("reset", commit=True),
    ],
)
def test_committed_then_failed_is_found_by_lookup(
    emu: Emulator, client: AllocationsClient, fault: Fault
) -> None:
    emu.add_fault(fault)
    result = send(client, "st1:x")
    assert result.status == "acked" and result.found_by_lookup and result.attempts == 1
    assert keys(emu) == ["st1:x"]
    assert result.event_id == emu.events()[0].usage_event_id
    assert [r["method"] for r in emu.requests()] == ["POST", "GET"]


def test_slow_after_commit_is_found_by_lookup(emu: Emulator, sleeps: list[float]) -> None:
    client = make_client(emu, sleeps, read_timeout_s=0.3)
    emu.add_fault(Fault("slow", delay_s=1.0, commit=True))
    result = send(client, "st1:slow")
    assert result.found_by_lookup and result.attempts == 1
    assert keys(emu) == ["st1:slow"]


@pytest.mark.parametrize(
    "fault", [Fault("status", status=503), Fault("reset"), Fault("status", status=500)]
)
def test_failed_before_commit_is_resent(
    emu: Emulator, client: AllocationsClient, fault: Fault
) -> None:
    emu.add_fault(fault)
    result = send(client, "st1:y")
    assert result.status == "acked" and not result.found_by_lookup and result.attempts == 2
    assert keys(emu) == ["st1:y"]
    assert [r["method"] for r in emu.requests()] == ["POST", "GET", "POST"]


def test_rate_limited_waits_and_resends(
    emu: Emulator, client: AllocationsClient, sleeps: list[float]
) -> None:
    emu.add_fault(Fault("status", status=429, retry_after="4"))
    assert send(client, "st1:z").attempts == 2
    assert sleeps == [4.0]
    assert api_calls(emu) == ["POST 429", "POST 200"]


def test_dead_letter_does_not_block_others(emu: Emulator, client: AllocationsClient) -> None:
    emu.add_fault(Fault("status", status=400, event_key="st1:bad", message="quantity too big"))
    dead = send(client, "st1:bad")
    assert dead.status == "dead" and "quantity too big" in dead.error
    assert send(client, "st1:ok").status == "acked"
    assert keys(emu) == ["st1:ok"]


def test_outage_exhausts_then_next_sync_checks_before_sending(
    emu: Emulator, client: AllocationsClient, sleeps: list[float]
) -> None:
    emu.outage(3600)
    with pytest.raises(DeliveryFailed) as info:
        send(client, "st1:o")
    assert info.value.last_outcome_unknown is True
    assert keys(emu) == []
    emu.clear_faults()  # the API is back; a new sync (new client) resumes
    later = make_client(emu, sleeps)
    calls_before = len(emu.requests())
    result = send(later, "st1:o", unknown_before=info.value.last_outcome_unknown)
    assert result.status == "acked" and not result.found_by_lookup
    assert keys(emu) == ["st1:o"]
    assert api_calls(emu)[calls_before:] == ["GET 200", "POST 200"]  # checked, then sent


def test_many_events_through_mixed_faults_are_stored_exactly_once(
    emu: Emulator, client: AllocationsClient
) -> None:
    kinds = [
        Fault("status", status=500, commit=True),
        Fault("status", status=503),
        Fault("reset", commit=True),
        Fault("reset"),
        Fault("status", status=429, retry_after="1"),
        Fault("status", status=502, commit=True, times=2),  # the look-up fails too
    ]
    delivered = []
    for i, fault in zip(range(24), itertools.cycle(kinds)):
        emu.add_fault(fault)
        delivered.append(send(client, f"st1:m:{i}"))
    assert all(d.status == "acked" for d in delivered)
    counts = Counter(keys(emu))
    assert set(counts) == {f"st1:m:{i}" for i in range(24)}
    assert set(counts.values()) == {1}
    assert {d.event_id for d in delivered} == {e.usage_event_id for e in emu.events()}


# --- the admin endpoint and the process mode ---------------------------------------------------


def test_admin_endpoint(emu: Emulator, client: AllocationsClient, clock: FakeClock) -> None:
    admin = AdminClient(emu.base_url)
    assert admin.health()
    admin.add_fault(Fault("status", status=503, commit=True))
    admin.add_fault({"kind": "reset", "eventKey": "k9"})
    assert [f["kind"] for f in admin.faults()["faults"]] == ["status", "reset"]
    with pytest.raises(OutcomeUnknown):
        client.post_usage("physics", body("k1"))
    (event,) = admin.events()
    assert (event.event_key, event.amount) == ("k1", Decimal("0.1875"))
    assert [r["status"] for r in admin.requests()] == [503]
    admin.clear_faults()
    admin.outage(10)
    assert admin.faults()["outageRemaining"] == 10
    with pytest.raises(OutcomeUnknown):
        client.post_usage("physics", body("k2"))
    admin.reset()
    assert admin.events() == [] and admin.requests() == [] and admin.faults()["faults"] == []
    client.post_usage("physics", body("k3"))
    assert [e.event_key for e in admin.events()] == ["k3"]
    admin.reset({"allocations": {"a": "u"}, "units": {"u": {}}, "skus": {"u": {"S": {}}}})
    assert admin._call("GET", "/catalog")["allocations"] == {"a": "u"}


def test_admin_clock(emu: Emulator, client: AllocationsClient) -> None:
    admin = AdminClient(emu.base_url)
    real = datetime.now(timezone.utc)
    assert abs(admin.now() - real) < timedelta(seconds=5)
    assert admin._call("GET", "/clock")["pinned"] is False
    pinned = datetime(2026, 4, 1, 8, 30, tzinfo=timezone(timedelta(hours=2)))
    admin.set_now(pinned)
    assert admin._call("GET", "/clock") == {"now": "2026-04-01T06:30:00.000Z", "pinned": True}
    assert admin.now() == pinned
    assert client.post_usage("physics", body("k"))["createdAt"] == "2026-04-01T06:30:00.000Z"
    admin.set_now(None)
    assert abs(admin.now() - real) < timedelta(seconds=5)
    with pytest.raises(ValueError, match="aware"):
        admin.set_now(datetime(2026, 4, 1))


@pytest.mark.parametrize(
    ("route", "payload"),
    [
        ("/faults", {"kind": "explode"}),
        ("/faults", {"kind": "reset", "colour": "red"}),
        ("/outage", {"seconds": "soon"}),
        ("/reset", {"catalog": {"allocations": {"a": "missing-unit"}}}),
        ("/clock", {"now": "tomorrow"}),
        ("/clock", {"when": "2026-01-01T00:00:00Z"}),
        ("/clock", {"now": "2026-01-01T00:00:00"}),
    ],
)
def test_admin_endpoint_refuses_nonsense(emu: Emulator, route: str, payload: Any) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        AdminClient(emu.base_url)._call("POST", route, payload)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"] is True


def test_process_mode_keeps_state_in_its_file(tmp_path: Path, sleeps: list[float]) -> None:
    state = tmp_path / "emulator-state.json"
    with EmulatorProcess(state_file=state) as process:
        assert process.base_url.startswith("http://127.0.0.1:")
        client = AllocationsClient(
            process.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY, sleep=sleeps.append
        )
        process.admin.add_fault(Fault("status", status=500, commit=True))
        result = send(client, "st1:p")
        assert result.found_by_lookup
        assert [e.event_key for e in process.admin.events()] == ["st1:p"]
    assert process.process is not None and process.process.returncode == 0
    with EmulatorProcess(state_file=state) as again:
        client = AllocationsClient(
            again.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY, sleep=sleeps.append
        )
        assert client.find_usage("physics", "st1:p") is not None
        assert [e.event_key for e in again.admin.events()] == ["st1:p"]
        again.admin.set_now(datetime(2100, 6, 1, tzinfo=timezone.utc))
        client.post_usage("physics", body("st1:q"))
        late = datetime(2100, 6, 1, tzinfo=timezone.utc)
        (item,) = client.iter_usage("physics", created_from=late)
        assert (item["metadata"]["eventKey"], item["createdAt"]) == (
            "st1:q",
            "2100-06-01T00:00:00.000Z",
        )
