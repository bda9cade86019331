"""The Allocations API client and the exactly-once delivery step, against ``responses``."""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
import urllib3.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

from slurm_tracker import __version__, api, api_client, config, errors
from slurm_tracker.api import (
    AllocationsClient,
    DeliveryFailed,
    FatalApiError,
    NotSent,
    OutcomeUnknown,
    RateLimited,
    derive_base_url,
    host_from_key,
    load_api_key,
    parse_retry_after,
    search_term,
)
from slurm_tracker.delivery import Delivery, deliver

HOST = "api.example.test"
BASE = f"https://{HOST}"
ORG = "acme"
SECRET = "s3cr3t-VALUE-9f8e7d"
KEY = "pwt_" + base64.urlsafe_b64encode(HOST.encode()).decode().rstrip("=") + "." + SECRET
USAGE = f"{BASE}/api/organizations/{ORG}/allocations/physics/usage"
BODY: dict[str, Any] = {
    "sku": "CPU_HOUR",
    "quantity": 1.5,
    "startedAt": "2026-03-01T00:00:00Z",
    "endedAt": "2026-03-01T01:00:00Z",
    "user": "alice",
    "metadata": {"eventKey": "st1:c:1:100:0-3600:CPU_HOUR"},
}
EVENT_KEY = BODY["metadata"]["eventKey"]
CREATED = {
    "id": "ue-1",
    "organization": ORG,
    "allocation": "physics",
    "quantity": 1.5,
    "startedAt": BODY["startedAt"],
    "endedAt": BODY["endedAt"],
    "createdAt": "2026-03-01T01:00:01Z",
}
EMPTY_PAGE = {"items": [], "total": 0, "page": 1, "pageSize": 100, "totalPages": 0}


def item(key: str, item_id: str = "rc-1", usage_id: str = "ue-1") -> dict[str, Any]:
    """A list item (RatedCostWithMetadata) carrying ``key``."""
    return {
        "id": item_id,
        "usageEventId": usage_id,
        "organizationId": "o",
        "allocationId": "a",
        "unitId": "u",
        "quantity": 1.5,
        "amount": 1.5,
        "startedAt": BODY["startedAt"],
        "endedAt": BODY["endedAt"],
        "createdAt": "2026-03-01T01:00:01Z",
        "type": "Compute",
        "subtype": "CoreHour",
        "unitAppliedRate": 1,
        "skuAppliedRate": 1,
        "metadata": {"eventKey": key},
    }


def page(items: list[Any], number: int = 1, total_pages: int = 1) -> dict[str, Any]:
    return {
        "items": items,
        "total": len(items),
        "page": number,
        "pageSize": 100,
        "totalPages": total_pages,
    }


def refused() -> requests.exceptions.ConnectionError:
    reason = urllib3.exceptions.NewConnectionError(
        None,  # type: ignore[arg-type]
        "Failed to establish a new connection: [Errno 111] Connection refused",
    )
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/x", reason)  # type: ignore[arg-type]
    )


def reset_after_send() -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError(
            "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")
        )
    )


def ssl_error(inner: Exception) -> requests.exceptions.SSLError:
    return requests.exceptions.SSLError(
        urllib3.exceptions.MaxRetryError(
            None,  # type: ignore[arg-type]
            "/x",
            urllib3.exceptions.SSLError(inner),
        )
    )


class Recorder:
    """``sleep`` and ``before_attempt`` doubles."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.attempts: list[int] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def before(self, number: int) -> None:
        self.attempts.append(number)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def client(rec: Recorder, **kwargs: Any) -> AllocationsClient:
    kwargs.setdefault("max_retry_time_s", 1000)
    return AllocationsClient(BASE, ORG, KEY, sleep=rec.sleep, **kwargs)


def run(c: AllocationsClient, rec: Recorder, unknown_before: bool = False) -> Delivery:
    return deliver(
        c,
        "physics",
        BODY,
        EVENT_KEY,
        outcome_unknown_before=unknown_before,
        before_attempt=rec.before,
    )


def methods(rsps: responses.RequestsMock) -> list[str]:
    return [str(call.request.method) for call in rsps.calls]


# --- the request itself ------------------------------------------------------------------------


def test_post_usage_sends_exact_url_auth_agent_and_body(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    url = f"{BASE}/api/organizations/my%20org/allocations/lab%2F%C3%A9%20b%3F/usage"
    rsps.add(responses.POST, url, json=CREATED)
    c = AllocationsClient(BASE, "my org", KEY, sleep=rec.sleep)
    body = dict(BODY, quantity=Decimal("1.500000"))

    assert c.post_usage("lab/é b?", body) == CREATED

    (call,) = rsps.calls
    assert call.request.url == url
    expected_auth = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    assert call.request.headers["Authorization"] == expected_auth
    assert call.request.headers["User-Agent"] == f"slurm-tracker/{__version__}"
    assert call.request.headers["Content-Type"] == "application/json"
    assert call.request.headers["Accept"] == "application/json"
    assert json.loads(call.request.body or b"") == dict(BODY, quantity=1.5)


def test_datetimes_are_sent_as_rfc3339_utc(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.POST, USAGE, json=CREATED)
    start = datetime(2026, 3, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    client(rec).post_usage("physics", dict(BODY, startedAt=start))
    sent = json.loads(rsps.calls[0].request.body or b"")
    assert sent["startedAt"] == "2026-03-01T00:00:00Z"


@pytest.mark.parametrize(
    ("call", "method", "url", "body", "answer"),
    [
        (lambda c: c.get_allocation("a b"), "GET", "/allocations/a%20b", None, {"name": "a b"}),
        (lambda c: c.list_units(), "GET", "/units", None, [{"name": "u"}]),
        (lambda c: c.list_skus("u/1"), "GET", "/units/u%2F1/skus", None, [{"code": "A"}]),
        (
            lambda c: c.list_skus("u", include_archived=True),
            "GET",
            "/units/u/skus?includeArchived=true",
            None,
            [{"code": "A"}],
        ),
        (
            lambda c: c.list_sku_rules("u", "sku-id"),
            "GET",
            "/units/u/skus/sku-id/rules",
            None,
            [{"rate": 1}],
        ),
        (
            lambda c: c.delete_usage("physics", ["rc-1", "rc-2"]),
            "DELETE",
            "/allocations/physics/usage",
            {"ids": ["rc-1", "rc-2"]},
            {"deleted": 2},
        ),
    ],
)
def test_other_endpoints_request(
    rsps: responses.RequestsMock,
    rec: Recorder,
    call: Callable[[AllocationsClient], object],
    method: str,
    url: str,
    body: Optional[dict[str, Any]],
    answer: object,
) -> None:
    rsps.add(method, f"{BASE}/api/organizations/{ORG}{url}", json=answer)
    result = call(client(rec))
    assert result == (2 if method == "DELETE" else answer)
    (only,) = rsps.calls
    assert only.request.method == method
    assert only.request.url == f"{BASE}/api/organizations/{ORG}{url}"
    assert (json.loads(only.request.body) if only.request.body else None) == body


def test_reads_return_lists_and_retry_transient_failures(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    units = f"{BASE}/api/organizations/{ORG}/units"
    rsps.add(responses.GET, units, status=502)
    rsps.add(responses.GET, units, body=reset_after_send())
    rsps.add(responses.GET, units, json=None)
    assert client(rec).list_units() == []
    assert methods(rsps) == ["GET", "GET", "GET"]
    assert len(rec.sleeps) == 2


def test_reads_give_up_after_max_attempts(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, f"{BASE}/api/organizations/{ORG}/allocations/x", status=503)
    with pytest.raises(OutcomeUnknown, match="HTTP 503"):
        client(rec, max_attempts=3).get_allocation("x")
    assert len(rsps.calls) == 3


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (refused(), NotSent),
        (requests.exceptions.ConnectTimeout("connect timed out"), NotSent),
        (ssl_error(ssl.SSLCertVerificationError(1, "certificate verify failed")), NotSent),
        # urllib3 1.x checks the host name itself, after the handshake, before sending
        (ssl_error(HostnameMismatch("hostname 'a' doesn't match 'b'")), NotSent),
        (ssl_error(ssl.SSLError(1, "bad record mac")), OutcomeUnknown),
        (requests.exceptions.ReadTimeout("read timed out"), OutcomeUnknown),
        (reset_after_send(), OutcomeUnknown),
        (requests.exceptions.ChunkedEncodingError("incomplete chunk"), OutcomeUnknown),
        (requests.exceptions.ConnectionError("anything else"), OutcomeUnknown),
    ],
)
def test_network_failures_are_classified(
    rsps: responses.RequestsMock,
    rec: Recorder,
    failure: Exception,
    expected: type[Exception],
) -> None:
    rsps.add(responses.POST, USAGE, body=failure)
    with pytest.raises(expected) as info:
        client(rec).post_usage("physics", BODY)
    assert type(info.value) is expected
    assert isinstance(info.value, errors.ApiUnavailable)


def test_name_resolution_failure_is_not_sent(rsps: responses.RequestsMock, rec: Recorder) -> None:
    name_error = getattr(urllib3.exceptions, "NameResolutionError", None)
    if name_error is None:  # urllib3 1.x reports it as a NewConnectionError
        pytest.skip("urllib3 < 2 has no NameResolutionError")
    reason = name_error(HOST, None, OSError("Name or service not known"))
    failure = requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/x", reason)  # type: ignore[arg-type]
    )
    rsps.add(responses.POST, USAGE, body=failure)
    with pytest.raises(NotSent):
        client(rec).post_usage("physics", BODY)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, "<html>not json</html>", OutcomeUnknown),
        (200, json.dumps({"no": "id"}), OutcomeUnknown),
        (408, "", OutcomeUnknown),
        (500, "", OutcomeUnknown),
        (502, "<html>Bad Gateway</html>", OutcomeUnknown),
        (503, "", OutcomeUnknown),
        (504, "", OutcomeUnknown),
        (429, "", RateLimited),
        (400, "", errors.ApiError),
        (404, "", errors.ApiError),
        (409, "", errors.ApiError),
        (422, "", errors.ApiError),
        (401, "", FatalApiError),
        (403, "", FatalApiError),
        (301, "", FatalApiError),
    ],
)
def test_http_statuses_are_classified(
    rsps: responses.RequestsMock,
    rec: Recorder,
    status: int,
    body: str,
    expected: type[Exception],
) -> None:
    rsps.add(responses.POST, USAGE, status=status, body=body, headers={"Location": BASE + "/x"})
    with pytest.raises(errors.TrackerError) as info:
        client(rec).post_usage("physics", BODY)
    assert type(info.value) is expected
    if isinstance(info.value, errors.ApiError):
        assert info.value.status == status


@pytest.mark.parametrize(
    ("content_type", "body", "message", "code"),
    [
        (
            "application/json",
            {"error": True, "message": "SKU 'X' not found", "code": "not_found", "errors": None},
            "SKU 'X' not found",
            "not_found",
        ),
        (
            "application/json",
            {"error": True, "message": "invalid", "code": "invalid", "errors": ["#/quantity: x"]},
            "invalid (#/quantity: x)",
            "invalid",
        ),
        (
            "application/problem+json",
            {
                "type": "/problems/invalid",
                "title": "Invalid",
                "status": 400,
                "detail": "the body is invalid",
                "code": "invalid",
                "errors": [{"type": "/p", "code": "type", "pointer": "#/sku", "detail": "bad"}],
            },
            "the body is invalid (#/sku: bad)",
            "invalid",
        ),
        ("text/html", "<h1>Nope</h1>", "Bad Request: <h1>Nope</h1>", ""),
    ],
)
def test_permanent_error_carries_the_api_message(
    rsps: responses.RequestsMock,
    rec: Recorder,
    content_type: str,
    body: object,
    message: str,
    code: str,
) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    rsps.add(responses.POST, USAGE, status=400, body=text, content_type=content_type)
    with pytest.raises(errors.ApiError) as info:
        client(rec).post_usage("physics", BODY)
    assert info.value.message.endswith(message)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("status", "over", "expected"),
    [
        (200, False, None),
        (200, True, OutcomeUnknown),
        (500, True, OutcomeUnknown),
        (400, True, errors.ApiError),
        (401, True, FatalApiError),
        (429, True, RateLimited),
    ],
)
def test_an_answer_over_the_cap_keeps_its_status_or_is_unknown(
    rsps: responses.RequestsMock,
    rec: Recorder,
    status: int,
    over: bool,
    expected: Optional[type[Exception]],
) -> None:
    cap = 1000
    text = json.dumps(CREATED)
    body = text + " " * (cap - len(text) + (1 if over else 0))
    rsps.add(responses.POST, USAGE, status=status, body=body)
    c = client(rec, max_response_bytes=cap)
    if expected is None:
        assert c.post_usage("physics", BODY) == CREATED
        return
    with pytest.raises(errors.TrackerError) as info:
        c.post_usage("physics", BODY)
    assert type(info.value) is expected
    if status == 200:
        assert "larger than 1000 bytes" in str(info.value)


def test_a_long_error_message_is_clipped(rsps: responses.RequestsMock, rec: Recorder) -> None:
    error = {"message": "m" * 50_000, "code": "c" * 5000, "errors": ["e" * 5000] * 20}
    rsps.add(responses.POST, USAGE, status=422, json=error)
    with pytest.raises(errors.ApiError) as info:
        client(rec).post_usage("physics", BODY)
    assert len(str(info.value)) < 3000
    assert info.value.message.count("eeee...") == 10


def test_a_deeply_nested_answer_is_outcome_unknown(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, body="[" * 200_000 + "]" * 200_000)
    with pytest.raises(OutcomeUnknown, match="not JSON"):
        client(rec).post_usage("physics", BODY)


# --- deliver -----------------------------------------------------------------------------------


def test_deliver_acks_on_first_success(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.POST, USAGE, json=CREATED)
    assert run(client(rec), rec) == Delivery("acked", "ue-1", attempts=1)
    assert rec.attempts == [1]
    assert rec.sleeps == []


def test_deliver_retries_503_with_lookups_then_succeeds(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, status=503)
    rsps.add(responses.POST, USAGE, status=503)
    rsps.add(responses.POST, USAGE, json=CREATED)
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)

    result = run(client(rec, backoff_base_s=1.0), rec)

    assert result == Delivery("acked", "ue-1", attempts=3)
    assert methods(rsps) == ["POST", "GET", "POST", "GET", "POST"]
    assert rec.attempts == [1, 2, 3]
    assert len(rec.sleeps) == 2
    assert 0 <= rec.sleeps[0] <= 1 and 0 <= rec.sleeps[1] <= 2  # full jitter, doubling


@pytest.mark.parametrize("status", [429, 503])
def test_deliver_honours_retry_after_seconds(
    rsps: responses.RequestsMock, rec: Recorder, status: int
) -> None:
    rsps.add(responses.POST, USAGE, status=status, headers={"Retry-After": "7"})
    rsps.add(responses.POST, USAGE, json=CREATED)
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)

    assert run(client(rec), rec).status == "acked"

    assert rec.sleeps == [7.0]
    # 429 was refused (no look-up needed); a 503's outcome is unknown (look-up first)
    assert methods(rsps) == (["POST", "POST"] if status == 429 else ["POST", "GET", "POST"])


def test_deliver_honours_retry_after_http_date(rsps: responses.RequestsMock, rec: Recorder) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    rsps.add(
        responses.POST, USAGE, status=429, headers={"Retry-After": format_datetime(when, True)}
    )
    rsps.add(responses.POST, USAGE, json=CREATED)
    run(client(rec), rec)
    (wait,) = rec.sleeps
    assert 60 < wait <= 121


def test_deliver_dead_letters_a_400_without_retry(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    error = {"error": True, "message": "quantity must be positive", "code": "invalid"}
    rsps.add(responses.POST, USAGE, status=400, json=error)

    result = run(client(rec), rec)

    assert result.status == "dead"
    assert result.event_id is None
    assert "quantity must be positive" in result.error
    assert result.attempts == 1
    assert methods(rsps) == ["POST"]
    assert rec.sleeps == []


@pytest.mark.parametrize("status", [401, 403])
def test_deliver_stops_the_sync_on_auth_failure(
    rsps: responses.RequestsMock, rec: Recorder, status: int
) -> None:
    rsps.add(responses.POST, USAGE, status=status, json={"error": True, "message": "no"})
    with pytest.raises(FatalApiError) as info:
        run(client(rec), rec)
    assert info.value.status == status
    assert methods(rsps) == ["POST"]


def test_ambiguous_timeout_then_lookup_finds_it_no_second_post(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, body=requests.exceptions.ReadTimeout("timed out"))
    rsps.add(responses.POST, USAGE, json=CREATED)  # must not be used
    rsps.add(responses.GET, USAGE, json=page([item(EVENT_KEY, "rc-9", "ue-9")]))

    result = run(client(rec), rec)

    assert result == Delivery("acked", "ue-9", attempts=1, found_by_lookup=True)
    assert methods(rsps) == ["POST", "GET"]
    assert rec.attempts == [1]


def test_ambiguous_reset_then_lookup_misses_it_resends(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, body=reset_after_send())
    rsps.add(responses.POST, USAGE, json=CREATED)
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)

    result = run(client(rec), rec)

    assert result == Delivery("acked", "ue-1", attempts=2)
    assert methods(rsps) == ["POST", "GET", "POST"]
    assert rec.attempts == [1, 2]


def test_not_sent_is_resent_without_lookup(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.POST, USAGE, body=refused())
    rsps.add(responses.POST, USAGE, json=CREATED)

    result = run(client(rec), rec)

    assert result == Delivery("acked", "ue-1", attempts=2)
    assert methods(rsps) == ["POST", "POST"]


def test_unknown_outcome_from_an_earlier_process_is_looked_up_first(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.GET, USAGE, json=page([item(EVENT_KEY)]))

    result = run(client(rec), rec, unknown_before=True)

    assert result == Delivery("acked", "ue-1", attempts=0, found_by_lookup=True)
    assert methods(rsps) == ["GET"]
    assert rec.attempts == []  # nothing was about to be sent


def test_failed_lookup_keeps_the_outcome_unknown(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.GET, USAGE, body=refused())
    with pytest.raises(DeliveryFailed) as info:
        run(client(rec, max_attempts=2), rec, unknown_before=True)
    assert info.value.last_outcome_unknown is True
    assert methods(rsps) == ["GET", "GET"]
    assert rec.attempts == []


def test_refused_lookup_stops_the_sync(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, USAGE, status=400, json={"error": True, "message": "bad filter"})
    with pytest.raises(FatalApiError, match="bad filter"):
        run(client(rec), rec, unknown_before=True)
    assert rec.attempts == []


# --- find_usage --------------------------------------------------------------------------------


def test_find_usage_walks_pages_and_matches_the_key_exactly(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    key = "st1:c:1:100:0-3600:CPU"
    rsps.add(
        responses.GET,
        USAGE,
        json=page(
            [
                item(key.upper(), "rc-upper"),  # the server search is case-insensitive
                item(key + "_GPU", "rc-longer"),  # ... and a substring search
                dict(item("x"), metadata={"note": key}),
                dict(item("y"), metadata=None),
            ],
            number=1,
            total_pages=2,
        ),
    )
    rsps.add(responses.GET, USAGE, json=page([item(key, "rc-exact")], number=2, total_pages=2))

    found = client(rec).find_usage("physics", key)

    assert found is not None and found["id"] == "rc-exact"
    queries = [parse_qs(urlsplit(call.request.url or "").query) for call in rsps.calls]
    assert queries == [
        {"metadata": [key], "page": ["1"], "pageSize": ["100"]},
        {"metadata": [key], "page": ["2"], "pageSize": ["100"]},
    ]


@pytest.mark.parametrize(
    "answer",
    [
        EMPTY_PAGE,
        {"items": None, "total": 0, "page": 1, "pageSize": 100, "totalPages": 0},
        page([item("st1:other")], number=1, total_pages=1),
    ],
)
def test_find_usage_returns_none_when_absent(
    rsps: responses.RequestsMock, rec: Recorder, answer: dict[str, Any]
) -> None:
    rsps.add(responses.GET, USAGE, json=answer)
    assert client(rec).find_usage("physics", "st1:c:1") is None
    assert len(rsps.calls) == 1


def test_find_usage_retries_transient_failures(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, USAGE, status=500)
    rsps.add(responses.GET, USAGE, json=page([item("k")]))
    assert client(rec).find_usage("physics", "k") is not None
    assert len(rec.sleeps) == 1


@pytest.mark.parametrize(
    ("key", "term"),
    [
        ("st1:c:1:100:0-3600:CPU_HOUR", "st1:c:1:100:0-3600:CPU_HOUR"),
        ('st1:"quoted":1', "quoted"),
        ("st1:clüster-with-long-name:1", "ster-with-long-name:1"),
        ("a<b&c>dddd", "dddd"),
    ],
)
def test_search_term_avoids_characters_json_may_escape(key: str, term: str) -> None:
    assert search_term(key) == term


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_search_term_is_found_in_any_json_spelling_of_the_key(key: str) -> None:
    term = search_term(key).lower()
    spellings = [
        json.dumps({"eventKey": key}, ensure_ascii=True),
        json.dumps({"eventKey": key}, ensure_ascii=False),
        json.dumps({"eventKey": key})
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026"),  # Go's encoding/json
    ]
    assert term in key.lower()
    for text in spellings:
        assert term in text.lower()


# --- iter_usage --------------------------------------------------------------------------------


def queries(rsps: responses.RequestsMock) -> list[dict[str, list[str]]]:
    return [
        parse_qs(urlsplit(call.request.url or "").query, keep_blank_values=True)
        for call in rsps.calls
    ]


def test_iter_usage_sends_every_filter_and_walks_the_pages(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    plus2 = timezone(timedelta(hours=2))
    rsps.add(
        responses.GET,
        USAGE,
        json=page([item("a", "rc-1"), "junk", None, item("b", "rc-2")], number=1, total_pages=3),
    )
    rsps.add(responses.GET, USAGE, json=page([item("c", "rc-3"), 7], number=2, total_pages=3))
    rsps.add(responses.GET, USAGE, json=page([item("d", "rc-4")], number=3, total_pages=3))

    found = client(rec).iter_usage(
        "physics",
        metadata='"eventKey": "st1:c1:',
        started_from=datetime(2026, 3, 1, 2, 0, tzinfo=plus2),
        started_to=datetime(2026, 3, 2, tzinfo=timezone.utc),
        ended_from=datetime(2026, 3, 1, 0, 0, 0, 250000, tzinfo=timezone.utc),
        ended_to=datetime(2026, 3, 3, tzinfo=timezone.utc),
        created_from=datetime(2026, 3, 4, 1, tzinfo=plus2),
        created_to=datetime(2026, 3, 5, 23, 59, 59, tzinfo=timezone.utc),
        page_size=7,
    )

    assert [i["id"] for i in found] == ["rc-1", "rc-2", "rc-3", "rc-4"]
    filters = {
        "metadata": ['"eventKey": "st1:c1:'],
        "startedAtFrom": ["2026-03-01T00:00:00Z"],
        "startedAtTo": ["2026-03-02T00:00:00Z"],
        "endedAtFrom": ["2026-03-01T00:00:00.250000Z"],
        "endedAtTo": ["2026-03-03T00:00:00Z"],
        "createdAtFrom": ["2026-03-03T23:00:00Z"],
        "createdAtTo": ["2026-03-05T23:59:59Z"],
    }
    assert queries(rsps) == [{**filters, "page": [str(n)], "pageSize": ["7"]} for n in (1, 2, 3)]
    assert rec.sleeps == []


def test_iter_usage_without_filters_sends_only_the_page(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.GET, USAGE, json=page([item("a")]))
    assert len(list(client(rec).iter_usage("physics", metadata=""))) == 1
    assert queries(rsps) == [{"page": ["1"], "pageSize": ["100"]}]


def test_iter_usage_reads_one_page_at_a_time(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, USAGE, json=page([item("a", "rc-1")], number=1, total_pages=2))
    rsps.add(responses.GET, USAGE, json=page([item("b", "rc-2")], number=2, total_pages=2))
    found = client(rec).iter_usage("physics")
    assert len(rsps.calls) == 0
    assert next(found)["id"] == "rc-1"
    assert len(rsps.calls) == 1
    assert [i["id"] for i in found] == ["rc-2"]
    assert len(rsps.calls) == 2


@pytest.mark.parametrize(
    ("answers", "calls", "seen"),
    [
        # stops at totalPages, though the last page is full
        ([page([item("a")], 1, 2), page([item("b")], 2, 2), page([item("c")], 3, 3)], 2, 2),
        # stops at an empty page, whatever totalPages says
        ([page([item("a")], 1, 5), page([], 2, 5), page([item("c")], 3, 5)], 2, 1),
        ([page([item("a")], 1, 5), dict(page([], 2, 5), items=None), page([item("c")])], 2, 1),
        # stops when totalPages is missing or not a number
        ([{"items": [item("a")]}, page([item("b")], 2, 2)], 1, 1),
        ([dict(page([item("a")]), totalPages="2"), page([item("b")], 2, 2)], 1, 1),
        # a page of nothing but junk still counts as a page
        ([page(["x"], 1, 2), page([item("b")], 2, 2)], 2, 1),
    ],
)
def test_iter_usage_stops_where_the_pages_end(
    rsps: responses.RequestsMock,
    rec: Recorder,
    answers: list[dict[str, Any]],
    calls: int,
    seen: int,
) -> None:
    for answer in answers:
        rsps.add(responses.GET, USAGE, json=answer)
    assert len(list(client(rec).iter_usage("physics"))) == seen
    assert len(rsps.calls) == calls


def test_iter_usage_stops_after_max_pages(
    rsps: responses.RequestsMock,
    rec: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(api_client, "MAX_PAGES", 3)  # where the walk reads it
    rsps.add(responses.GET, USAGE, json=page([item("a")], 1, 1000))
    assert len(list(client(rec).iter_usage("physics"))) == 3
    assert [q["page"] for q in queries(rsps)] == [["1"], ["2"], ["3"]]
    assert "stopped after 3 pages" in caplog.text


def test_iter_usage_retries_each_page(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, USAGE, json=page([item("a", "rc-1")], 1, 2))
    rsps.add(responses.GET, USAGE, status=503)
    rsps.add(responses.GET, USAGE, body=reset_after_send())
    rsps.add(responses.GET, USAGE, status=429, headers={"Retry-After": "7"})
    rsps.add(responses.GET, USAGE, json=page([item("b", "rc-2")], 2, 2))

    assert [i["id"] for i in client(rec).iter_usage("physics")] == ["rc-1", "rc-2"]

    assert [q["page"] for q in queries(rsps)] == [["1"], ["2"], ["2"], ["2"], ["2"]]
    assert len(rec.sleeps) == 3 and rec.sleeps[2] == 7.0


def test_iter_usage_gives_up_after_max_attempts(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.GET, USAGE, status=502)
    with pytest.raises(OutcomeUnknown, match="HTTP 502"):
        list(client(rec, max_attempts=3).iter_usage("physics"))
    assert len(rsps.calls) == 3


@pytest.mark.parametrize(
    ("status", "raised"),
    [(404, errors.ApiError), (400, errors.ApiError), (401, FatalApiError), (403, FatalApiError)],
)
def test_iter_usage_refused_is_an_api_error_without_retry(
    rsps: responses.RequestsMock, rec: Recorder, status: int, raised: type[Exception]
) -> None:
    rsps.add(
        responses.GET,
        USAGE,
        status=status,
        json={"error": True, "message": "allocation 'physics' not found", "code": "not_found"},
    )
    with pytest.raises(raised) as info:
        list(client(rec).iter_usage("physics"))
    assert isinstance(info.value, errors.ApiError) and info.value.status == status
    assert not isinstance(info.value, errors.ApiUnavailable)
    assert len(rsps.calls) == 1 and rec.sleeps == []


@pytest.mark.parametrize(
    "answer",
    [[item("a")], {"items": "abc", "totalPages": 1}, {"items": {"id": "x"}, "totalPages": 1}],
)
def test_iter_usage_an_answer_that_is_not_a_page_is_unknown(
    rsps: responses.RequestsMock, rec: Recorder, answer: object
) -> None:
    rsps.add(responses.GET, USAGE, json=answer)
    with pytest.raises(OutcomeUnknown, match="not a page of usage events"):
        list(client(rec, max_attempts=2).iter_usage("physics"))
    assert len(rsps.calls) == 1  # like every read: the shape of a 2xx answer is not retried


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"started_from": datetime(2026, 3, 1)}, "naive datetime 2026-03-01T00:00:00 as "),
        ({"created_to": datetime(2026, 3, 1, 5)}, "createdAtTo"),
        ({"ended_from": "2026-03-01T00:00:00Z"}, "give a datetime"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": -5}, "page_size"),
        ({"page_size": True}, "page_size"),
        ({"page_size": 2.5}, "page_size"),
    ],
)
def test_iter_usage_checks_its_arguments_before_any_request(
    rsps: responses.RequestsMock, rec: Recorder, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=problem):
        client(rec).iter_usage("physics", **kwargs)
    assert len(rsps.calls) == 0


# --- delete_usage ------------------------------------------------------------------------------


def delete_bodies(rsps: responses.RequestsMock) -> list[dict[str, Any]]:
    return [json.loads(call.request.body or b"") for call in rsps.calls]


def test_delete_usage_sends_at_most_100_ids_per_request(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    ids = [f"rc-{n}" for n in range(250)]
    for deleted in (100, 97, 50):
        rsps.add(responses.DELETE, USAGE, json={"deleted": deleted})

    assert client(rec).delete_usage("physics", ids) == 247

    bodies = delete_bodies(rsps)
    assert [len(b["ids"]) for b in bodies] == [100, 100, 50]
    assert [i for b in bodies for i in b["ids"]] == ids
    assert all(set(b) == {"ids"} for b in bodies)


@pytest.mark.parametrize("count", [1, 99, 100, 101, 200])
def test_delete_usage_batch_boundaries(
    rsps: responses.RequestsMock, rec: Recorder, count: int
) -> None:
    rsps.add(responses.DELETE, USAGE, json={"deleted": 1})
    ids = (f"rc-{n}" for n in range(count))  # any iterable sequence of ids
    assert client(rec).delete_usage("physics", list(ids)) == -(-count // 100)
    assert [len(b["ids"]) for b in delete_bodies(rsps)] == [
        min(100, count - start) for start in range(0, count, 100)
    ]


def test_delete_usage_of_no_ids_sends_nothing(rsps: responses.RequestsMock, rec: Recorder) -> None:
    assert client(rec).delete_usage("physics", []) == 0
    assert len(rsps.calls) == 0


def test_delete_usage_retries_the_same_batch(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.DELETE, USAGE, json={"deleted": 100})
    rsps.add(responses.DELETE, USAGE, status=503)
    rsps.add(responses.DELETE, USAGE, body=requests.exceptions.ReadTimeout("slow"))
    rsps.add(responses.DELETE, USAGE, json={"deleted": 0})  # the lost attempt deleted them

    ids = [f"rc-{n}" for n in range(120)]
    assert client(rec).delete_usage("physics", ids) == 100

    bodies = delete_bodies(rsps)
    assert [b["ids"] for b in bodies] == [ids[:100], ids[100:], ids[100:], ids[100:]]
    assert len(rec.sleeps) == 2


@pytest.mark.parametrize(
    "answer",
    [{}, {"deleted": "3"}, {"deleted": -1}, {"deleted": True}, {"deleted": 1.5}, [], None],
)
def test_delete_usage_an_answer_without_a_count_is_unknown(
    rsps: responses.RequestsMock, rec: Recorder, answer: object
) -> None:
    if answer is None:
        rsps.add(responses.DELETE, USAGE, body=b"")
    else:
        rsps.add(responses.DELETE, USAGE, json=answer)
    with pytest.raises(OutcomeUnknown, match="no deleted count"):
        client(rec, max_attempts=2).delete_usage("physics", ["rc-1"])
    assert len(rsps.calls) == 2


def test_delete_usage_refused_is_an_api_error_without_retry(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.DELETE, USAGE, status=404, json={"error": True, "message": "no such"})
    with pytest.raises(errors.ApiError) as info:
        client(rec).delete_usage("physics", ["rc-1", "rc-2"])
    assert info.value.status == 404 and "no such" in info.value.message
    assert len(rsps.calls) == 1


# --- the retry budget --------------------------------------------------------------------------


def test_budget_exhaustion_raises_api_unavailable_with_unknown_flag(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, status=503, headers={"Retry-After": "2"})
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)
    c = client(rec, max_attempts=10, max_retry_time_s=5)

    with pytest.raises(errors.ApiUnavailable) as info:
        run(c, rec)

    failure = info.value
    assert isinstance(failure, DeliveryFailed)
    assert failure.last_outcome_unknown is True
    assert failure.event_key == EVENT_KEY
    assert failure.attempts == 3
    assert EVENT_KEY in str(failure) and "pending" in str(failure)
    assert rec.sleeps == [2.0, 2.0]  # a third wait would pass the 5 s budget
    assert methods(rsps) == ["POST", "GET", "POST", "GET", "POST"]

    # the budget is shared by the whole sync: the next event gets one try, no retry
    rsps.calls.reset()
    with pytest.raises(DeliveryFailed) as second:
        run(c, rec)
    assert second.value.attempts == 1
    assert methods(rsps) == ["POST"]


def test_attempts_exhaustion_after_not_sent_is_not_unknown(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    rsps.add(responses.POST, USAGE, body=refused())
    with pytest.raises(DeliveryFailed) as info:
        run(client(rec, max_attempts=3), rec)
    assert info.value.last_outcome_unknown is False
    assert info.value.attempts == 3
    assert methods(rsps) == ["POST", "POST", "POST"]
    assert "was not received" in str(info.value)


def test_budget_counts_time_lost_in_failed_attempts(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 15.0  # every clock read is 15 s later: each failed attempt costs 15 s
        return now[0]

    rsps.add(responses.POST, USAGE, body=requests.exceptions.ReadTimeout("slow"))
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)
    c = client(rec, max_attempts=100, max_retry_time_s=40, clock=clock, backoff_max_s=0.001)
    with pytest.raises(DeliveryFailed):
        run(c, rec)
    assert methods(rsps).count("POST") == 3  # 15 s, 30 s, then 45 s > 40 s: stop
    assert 45 <= c.budget.spent_s < 45.01


def test_rate_limit_spaces_requests(rsps: responses.RequestsMock) -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    rsps.add(responses.GET, f"{BASE}/api/organizations/{ORG}/units", json=[])
    c = AllocationsClient(BASE, ORG, KEY, requests_per_second=4, sleep=sleep, clock=lambda: now[0])
    for _ in range(3):
        c.list_units()
    assert sleeps == [0.25, 0.25]


def test_the_environment_proxy_and_ca_settings_are_read_once_and_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # requests would read os.environ at every request (trust_env); the client reads it once
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read here")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    c = AllocationsClient(BASE, ORG, KEY)
    assert c.session.trust_env is False
    assert c.session.proxies.get("https") == "http://proxy.example.test:3128"
    assert c.session.verify == str(bundle)
    monkeypatch.setenv("NO_PROXY", HOST)  # the API's host bypasses the proxy
    assert AllocationsClient(BASE, ORG, KEY).session.proxies == {}
    adapter = c.session.get_adapter(BASE)
    assert isinstance(adapter, requests.adapters.HTTPAdapter)
    assert adapter._pool_maxsize >= api.MAX_REQUEST_THREADS  # type: ignore[attr-defined]  # no connection dropped when busy


def test_a_cookie_set_by_the_server_is_sent_back(
    rsps: responses.RequestsMock, rec: Recorder
) -> None:
    # requests prepared from a template (the client's own session) must not lose what
    # Session.request would add: a load balancer's sticky-session cookie, for one
    rsps.add(responses.POST, USAGE, json=CREATED, headers={"Set-Cookie": "lb=node-7; Path=/"})
    rsps.add(responses.POST, USAGE, json=CREATED)
    c = client(rec)
    c.post_usage("physics", BODY)
    c.post_usage("physics", BODY)
    first, second = (call.request for call in rsps.calls)
    assert "Cookie" not in first.headers
    assert second.headers["Cookie"] == "lb=node-7"
    assert second.headers["Authorization"] == first.headers["Authorization"]
    assert second.body == first.body and second.headers["Content-Length"] == str(
        len(first.body or b"")
    )


def test_request_threads_are_reused(rsps: responses.RequestsMock, rec: Recorder) -> None:
    rsps.add(responses.GET, f"{BASE}/api/organizations/{ORG}/units", json=[])
    c = client(rec)
    before = {t.ident for t in threading.enumerate() if t.name == "slurm-tracker-request"}
    for _ in range(5):
        c.list_units()
    after = {t.ident for t in threading.enumerate() if t.name == "slurm-tracker-request"}
    assert len(after - before) == 1  # one after the other: one thread does them all


# --- secrecy -----------------------------------------------------------------------------------


def test_the_key_never_shows(
    rsps: responses.RequestsMock, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rsps.add(responses.POST, USAGE, body=requests.exceptions.ReadTimeout("t"))
    rsps.add(responses.POST, USAGE, status=400, json={"error": True, "message": "bad"})
    rsps.add(responses.GET, USAGE, json=EMPTY_PAGE)
    c = client(rec)
    seen: list[str] = [repr(c), str(c)]

    seen.append(run(c, rec).error)
    rsps.reset()
    rsps.add(responses.POST, USAGE, status=401, json={"error": True, "message": "who?"})
    with pytest.raises(FatalApiError) as fatal:
        run(c, rec)
    seen.append(str(fatal.value))
    rsps.reset()
    rsps.add(responses.POST, USAGE, body=refused())
    with pytest.raises(DeliveryFailed) as failed:
        run(client(rec, max_attempts=2), rec)
    seen.append(str(failed.value))
    for broken in ("pwt_%%%." + SECRET, "pwt_" + SECRET, "xyz." + SECRET):
        with pytest.raises(errors.ConfigError) as config:
            derive_base_url(None, broken, {})
        seen.append(str(config.value))

    assert caplog.records, "the test must see some log records"
    assert any(r.levelno == logging.INFO and "dead" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    basic = base64.b64encode(f"{KEY}:".encode()).decode()
    for text in [*seen, caplog.text]:
        assert SECRET not in text
        assert basic not in text


def test_key_file_errors_do_not_show_the_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"{KEY} extra {SECRET}\n")
    path.chmod(0o600)
    with pytest.raises(errors.ConfigError) as info:
        load_api_key(path, {})
    assert SECRET not in str(info.value)


# --- configuration -----------------------------------------------------------------------------


def encode_host(host: str, padded: bool = False) -> str:
    text = base64.urlsafe_b64encode(host.encode()).decode()
    return text if padded else text.rstrip("=")


@pytest.mark.parametrize(
    ("url", "environ", "key", "expected"),
    [
        ("https://api.example.org/", {}, KEY, "https://api.example.org"),
        ("api.example.org", {}, KEY, "https://api.example.org"),
        ("https://api.example.org:8443/base/", {}, KEY, "https://api.example.org:8443/base"),
        (None, {"PW_PLATFORM_HOST": "cloud.example.com"}, KEY, "https://cloud.example.com"),
        (None, {"PW_PLATFORM_HOST": "https://cloud.example.com"}, KEY, "https://cloud.example.com"),
        (None, {}, KEY, f"https://{HOST}"),
        (None, {}, f"pwt_{encode_host('a.b.io', padded=True)}.x", "https://a.b.io"),
        (None, {}, f"pwt_{encode_host('ab.io:8443')}.x", "https://ab.io:8443"),
        (None, {}, f"pwt_{encode_host('http://127.0.0.1:8080')}.x", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:9999", {}, KEY, "http://127.0.0.1:9999"),
        ("http://127.8.9.10", {}, KEY, "http://127.8.9.10"),
        ("http://localhost:1234/", {}, KEY, "http://localhost:1234"),
        ("http://[::1]:1234", {}, KEY, "http://[::1]:1234"),
        (
            "https://api.example.org",
            {"PW_PLATFORM_HOST": "other.org"},
            KEY,
            "https://api.example.org",
        ),
    ],
)
def test_derive_base_url(
    url: Optional[str], environ: dict[str, str], key: str, expected: str
) -> None:
    assert derive_base_url(url, key, environ) == expected


@pytest.mark.parametrize(
    ("url", "environ", "key", "problem"),
    [
        ("http://api.example.org", {}, KEY, "plain http"),
        ("http://10.0.0.5:8080", {}, KEY, "plain http"),
        ("http://128.0.0.1", {}, KEY, "plain http"),
        (None, {"PW_PLATFORM_HOST": "http://cloud.example.com"}, KEY, "plain http"),
        (None, {}, f"pwt_{encode_host('http://evil.example')}.x", "plain http"),
        ("ftp://api.example.org", {}, KEY, "https://"),
        ("https://api.example.org/?x=1", {}, KEY, "query"),
        ("https://user:pw@api.example.org", {}, KEY, "credentials"),
        ("https://api.example.org:99999", {}, KEY, "not a valid URL"),
        (None, {}, "no-prefix.secret", "cannot derive"),
        (None, {}, "pwt_onlyonepart", "cannot derive"),
        (None, {}, "pwt_!!!.secret", "cannot derive"),
        (None, {}, f"pwt_{encode_host('a b')}.x", "cannot derive"),
        ("http://foo.localhost:8080", {}, KEY, "plain http"),
        ("http://foo.localhost.", {}, KEY, "plain http"),
        ("http://localhost.evil.example", {}, KEY, "plain http"),
        (None, {"PW_PLATFORM_HOST": "http://api.localhost"}, KEY, "plain http"),
        (None, {}, f"pwt_{encode_host('http://evil.localhost:80')}.x", "plain http"),
    ],
)
def test_derive_base_url_refuses(
    url: Optional[str], environ: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(errors.ConfigError, match=problem):
        derive_base_url(url, key, environ)


def test_the_client_uses_the_one_loopback_validator_of_the_config() -> None:
    assert api.is_loopback is config.is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("[::1]", True),
        ("foo.localhost", False),
        ("foo.localhost.", False),
        ("localhost.localdomain", False),
        ("127.0.0.1.nip.io", False),
        ("128.0.0.1", False),
        ("[::2]", False),
        ("0.0.0.0", False),
        ("example.org", False),
    ],
)
def test_derive_base_url_allows_http_exactly_where_the_config_does(
    host: str, loopback: bool
) -> None:
    assert config.is_loopback(host) is loopback
    if loopback:
        assert derive_base_url(f"http://{host}:8080", KEY, {}).startswith("http://")
    else:
        with pytest.raises(errors.ConfigError, match="plain http"):
            derive_base_url(f"http://{host}:8080", KEY, {})


@settings(max_examples=150, deadline=None)
@given(
    host=st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
    ),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    padded=st.booleans(),
    secret=st.text(alphabet="abcdefXYZ0123456789-_", min_size=1, max_size=20),
)
def test_host_round_trips_through_a_key(
    host: str, port: Optional[int], padded: bool, secret: str
) -> None:
    netloc = host if port is None else f"{host}:{port}"
    key = f"pwt_{encode_host(netloc, padded)}.{secret}"
    assert host_from_key(key) == netloc
    assert derive_base_url(None, key, {}) == f"https://{netloc}"


def assert_no_content(message: str, content: str) -> None:
    """``message`` shows none of the key and no more than a few characters of ``content``."""
    assert KEY not in message and SECRET not in message
    for start in range(len(content) - 7):
        assert content[start : start + 8] not in message, message


@pytest.mark.parametrize(
    ("mode", "hint"),
    [
        (0o644, "chmod 600"),
        (0o640, "chmod 600"),
        (0o604, "chmod 600"),
        (0o660, "chmod go-w"),
        (0o700 | 0o070, "chmod go-w"),
        (0o602, "chmod go-w"),
    ],
)
def test_load_api_key_refuses_a_file_others_can_read(tmp_path: Path, mode: int, hint: str) -> None:
    path = tmp_path / "api.key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    with pytest.raises(errors.UnsafeFile) as info:
        load_api_key(path, {"PW_API_KEY": "ignored"})
    assert str(path) in str(info.value)
    assert hint in str(info.value)
    assert_no_content(str(info.value), KEY)


def test_load_api_key_refuses_a_symbolic_link(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    target.write_text(KEY + "\n")
    target.chmod(0o600)
    link = tmp_path / "api.key"
    link.symlink_to(target)
    with pytest.raises(errors.UnsafeFile, match="symbolic link") as info:
        load_api_key(link, {"PW_API_KEY": "ignored"})
    assert_no_content(str(info.value), KEY)


def test_load_api_key_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    # CI runs as root; chown to nobody (65534), as another local user could have made it
    path = tmp_path / "api.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(errors.UnsafeFile, match="uid 65534") as info:
        load_api_key(path, {"PW_API_KEY": "ignored"})
    assert_no_content(str(info.value), KEY)


def test_load_api_key_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    path = directory / "api.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    with pytest.raises(errors.UnsafeFile, match="writable by group and others") as info:
        load_api_key(path, {})
    assert_no_content(str(info.value), KEY)


def test_load_api_key_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "api.key"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_api_key(path, {})
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("opening a FIFO as the API key file blocked")
    (exc,) = outcome
    assert isinstance(exc, errors.UnsafeFile)
    assert "not a regular file" in str(exc)


def test_load_api_key_refuses_a_large_file_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "api.key"
    content = KEY + "\n" + "A" * 10_000 + "\n"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(errors.ConfigError, match="larger than 4096 bytes") as info:
        load_api_key(path, {})
    assert_no_content(str(info.value), content)


@pytest.mark.parametrize(
    "content", [f"{KEY} extra\n", f"{KEY}:x\n", "é" + KEY, b"\xff\xfe" + KEY.encode()]
)
def test_load_api_key_bad_content_is_not_echoed(tmp_path: Path, content: Union[str, bytes]) -> None:
    path = tmp_path / "api.key"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(errors.ConfigError) as info:
        load_api_key(path, {})
    text = content if isinstance(content, str) else KEY
    assert_no_content(str(info.value), text)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_api_key_reads_a_private_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "api.key"
    path.write_text(f"  {KEY}\n\n")
    path.chmod(mode)
    assert load_api_key(path, {"PW_API_KEY": "ignored"}) == KEY


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "is empty"), ("   \n", "is empty"), ("a b", "one API key"), ("a:b", "one API key")],
)
def test_load_api_key_refuses_a_bad_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "api.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(errors.ConfigError, match=problem):
        load_api_key(path, {})


def test_load_api_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="cannot read the API key file"):
        load_api_key(tmp_path / "nope", {})


def test_load_api_key_from_environment() -> None:
    assert load_api_key(None, {"PW_API_KEY": f" {KEY}\n"}) == KEY


@pytest.mark.parametrize("environ", [{}, {"PW_API_KEY": "  "}])
def test_load_api_key_missing_says_where_it_looks(environ: dict[str, str]) -> None:
    with pytest.raises(errors.ConfigError) as info:
        load_api_key(None, environ)
    assert "api_key_file" in str(info.value) and "PW_API_KEY" in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # in the past: no wait
        ("soon", None),
        ("-3", None),
    ],
)
def test_parse_retry_after(value: Optional[str], expected: Optional[float]) -> None:
    now_s = datetime(2015, 10, 21, 7, 27, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(value, now_s) == expected
