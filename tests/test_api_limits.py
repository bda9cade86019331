"""The API client against a real HTTP server on 127.0.0.1: bounded answers and a deadline.

A hostile or broken server must not make the agent read without limit (a 1 GB answer once
took 2.8 GB of memory) nor hold a request past ``connect_timeout + read_timeout`` (a server
dripping one byte every 200 ms never trips a per-read timeout). Each of those is a failed
attempt whose outcome is unknown, so ``deliver`` looks the event key up before posting again.
"""

from __future__ import annotations

import io
import json
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

import pytest
import requests

from slurm_tracker import api, errors
from slurm_tracker.api import AllocationsClient, NotSent, OutcomeUnknown
from slurm_tracker.delivery import Delivery, deliver

ORG = "acme"
USAGE_PATH = f"/api/organizations/{ORG}/allocations/physics/usage"
KEY = "pwt_eA.not-a-real-secret"
EVENT_KEY = "st1:c:1:100:0-3600:CPU_HOUR"
BODY: dict[str, Any] = {
    "sku": "CPU_HOUR",
    "quantity": 1.5,
    "startedAt": "2026-03-01T00:00:00Z",
    "endedAt": "2026-03-01T01:00:00Z",
    "metadata": {"eventKey": EVENT_KEY},
}
CREATED = {
    "id": "ue-1",
    "organization": ORG,
    "allocation": "physics",
    "quantity": 1.5,
    "startedAt": BODY["startedAt"],
    "endedAt": BODY["endedAt"],
    "createdAt": "2026-03-01T01:00:01Z",
}
FOUND_PAGE = {
    "items": [{"id": "rc-9", "usageEventId": "ue-9", "metadata": {"eventKey": EVENT_KEY}}],
    "total": 1,
    "page": 1,
    "pageSize": 100,
    "totalPages": 1,
}
ONE_GB = 1 << 30
MIB = 1 << 20
DRIP_EVERY_S = 0.2
DRIP_AT_MOST = 40  # bytes: a drip ends by itself after 8 s
CONNECT_S = 1.0
READ_S = 1.0
DEADLINE_S = CONNECT_S + READ_S
SLACK_S = 2.0  # machines are noisy


# --- a small HTTP server whose every answer is scripted -------------------------------------

Behaviour = Callable[["Handler"], None]


class Server(ThreadingHTTPServer):
    """Answers each request with the next scripted behaviour of its method (else a 500)."""

    daemon_threads = True
    block_on_close = True  # server_close() waits for the handlers; every handler is bounded

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.plans: dict[str, list[Behaviour]] = {"GET": [], "POST": []}
        self.seen: list[str] = []
        self.body_bytes_sent: list[int] = []  # per answer of send_huge
        self.answers_done = threading.Semaphore(0)  # released when a handler has finished
        self.stop = threading.Event()
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def plan(self, method: str, *behaviours: Behaviour) -> None:
        with self.lock:
            self.plans[method].extend(behaviours)

    def next_behaviour(self, method: str) -> Optional[Behaviour]:
        with self.lock:
            self.seen.append(method)
            queue = self.plans[method]
            return queue.pop(0) if queue else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.answer("GET")

    def do_POST(self) -> None:
        self.answer("POST")

    def answer(self, method: str) -> None:
        self.connection.settimeout(10)  # a write to a client that stopped reading ends
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        behaviour = self.server.next_behaviour(method)
        try:
            if behaviour is None:
                write_body(self, 500, b'{"error":true,"message":"nothing planned"}')
            else:
                behaviour(self)
        except OSError:  # the client went away (it closed an answer it refused)
            self.close_connection = True
        finally:
            self.server.answers_done.release()


def write_body(handler: Handler, status: int, data: bytes, chunked: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if chunked:
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for start in range(0, len(data), 64 * 1024):
            piece = data[start : start + 64 * 1024]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
    else:
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def send_json(value: object, size: Optional[int] = None, chunked: bool = False) -> Behaviour:
    """A 200 with ``value`` as JSON, padded with spaces (still valid JSON) to ``size`` bytes."""
    data = json.dumps(value).encode()
    if size is not None:
        assert size >= len(data)
        data += b" " * (size - len(data))

    def behaviour(handler: Handler) -> None:
        write_body(handler, 200, data, chunked)

    return behaviour


def send_huge(total: int, chunked: bool, *, redirect: bool = False) -> Behaviour:
    """A 200 with a ``total``-byte body generated 64 KiB at a time (never held in memory); with
    ``redirect``, a 302 to elsewhere with such a body."""

    def behaviour(handler: Handler) -> None:
        if redirect:
            handler.send_response(302)
            handler.send_header("Location", "https://elsewhere.example.test/usage")
        else:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(total))
        handler.end_headers()
        block = b" " * (64 * 1024)
        frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        sent = 0
        try:
            while sent < total and not handler.server.stop.is_set():
                handler.wfile.write(frame)
                sent += len(block)
        finally:
            with handler.server.lock:
                handler.server.body_bytes_sent.append(sent)
        handler.close_connection = True

    return behaviour


def drip(handler: Handler, data: bytes) -> None:
    for index in range(len(data)):
        if handler.server.stop.wait(DRIP_EVERY_S):
            break
        handler.wfile.write(data[index : index + 1])
    handler.close_connection = True


def drip_headers() -> Behaviour:
    """A status line, then a header one byte every 200 ms (headers never complete)."""

    def behaviour(handler: Handler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        drip(handler, b"a" * DRIP_AT_MOST)

    return behaviour


def drip_body() -> Behaviour:
    """Complete headers, then the body one byte every 200 ms."""

    def behaviour(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(DRIP_AT_MOST))
        handler.end_headers()
        drip(handler, b" " * DRIP_AT_MOST)

    return behaviour


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()  # drips and huge answers end at their next step
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def make_client(server: Server, **kwargs: Any) -> AllocationsClient:
    kwargs.setdefault("connect_timeout_s", CONNECT_S)
    kwargs.setdefault("read_timeout_s", READ_S)
    kwargs.setdefault("max_retry_time_s", 1000)
    return AllocationsClient(server.base_url, ORG, KEY, sleep=lambda _s: None, **kwargs)


def max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


# --- bounded bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_1_gb_answer_is_refused_fast_in_bounded_memory(server: Server, chunked: bool) -> None:
    server.plan("POST", send_huge(ONE_GB, chunked))
    client = make_client(server, read_timeout_s=10)
    rss_before = max_rss_bytes()
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(OutcomeUnknown, match="larger than") as info:
            client.post_usage("physics", BODY)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = max_rss_bytes() - rss_before

    assert info.value.outcome_unknown
    assert peak < 8 * MIB, f"{peak / MIB:.1f} MiB allocated while reading"
    assert rss_growth < 32 * MIB, f"peak RSS grew by {rss_growth / MIB:.1f} MiB"
    assert elapsed < 10
    # the client closed the answer: the server's next write failed and its handler ended
    assert server.answers_done.acquire(timeout=5)  # < the server's 10 s write timeout
    (sent,) = server.body_bytes_sent
    assert sent < 64 * MIB, f"the client let the server send {sent / MIB:.0f} MiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_exactly_at_the_cap_is_read(server: Server, chunked: bool) -> None:
    server.plan("POST", send_json(CREATED, size=api.MAX_RESPONSE_BYTES, chunked=chunked))
    assert make_client(server).post_usage("physics", BODY) == CREATED


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_byte_over_the_cap_is_outcome_unknown(server: Server, chunked: bool) -> None:
    server.plan("POST", send_json(CREATED, size=api.MAX_RESPONSE_BYTES + 1, chunked=chunked))
    with pytest.raises(OutcomeUnknown, match="larger than 1048576 bytes"):
        make_client(server).post_usage("physics", BODY)


def test_the_cap_is_a_constructor_parameter(server: Server) -> None:
    server.plan("POST", send_json(CREATED, size=2000), send_json(CREATED, size=2001))
    client = make_client(server, max_response_bytes=2000)
    assert client.post_usage("physics", BODY) == CREATED
    with pytest.raises(OutcomeUnknown, match="larger than 2000 bytes"):
        client.post_usage("physics", BODY)


def redirect_huge(total: int, chunked: bool) -> Behaviour:
    """A 302 to elsewhere with a ``total``-byte body (generated, never held in memory)."""
    return send_huge(total, chunked, redirect=True)


def send_cookie(handler: Handler) -> None:
    """A 200 with CREATED that sets a cookie (the client sends it back from then on)."""
    data = json.dumps(CREATED).encode()
    handler.send_response(200)
    handler.send_header("Set-Cookie", "lb=node-7; Path=/")
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("cookie", [False, True], ids=["no-cookie", "cookie"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_redirect_with_a_huge_body_is_refused_without_reading_it(
    server: Server, chunked: bool, cookie: bool
) -> None:
    # requests' Session.send reads a redirect's whole body (to follow it, even when told not
    # to): the client reads it within the limit like any answer, and refuses the redirect
    client = make_client(server, read_timeout_s=10)
    if cookie:  # with a cookie held, each request is prepared anew: the same limit applies
        server.plan("POST", send_cookie)
        assert client.post_usage("physics", BODY) == CREATED
        server.seen.clear()
        assert server.answers_done.acquire(timeout=5)
    server.plan("POST", redirect_huge(ONE_GB, chunked))
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(api.FatalApiError, match="unexpected redirect to https://elsewhere"):
            client.post_usage("physics", BODY)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5
    assert peak < 8 * MIB, f"{peak / MIB:.1f} MiB allocated while reading"
    assert server.answers_done.acquire(timeout=5)
    (sent,) = server.body_bytes_sent
    assert sent < 64 * MIB, f"the client let the server send {sent / MIB:.0f} MiB"
    assert server.seen == ["POST"]


def test_a_huge_error_answer_keeps_its_status_and_a_short_message(server: Server) -> None:
    def huge_400(handler: Handler) -> None:
        write_body(handler, 400, b'{"message":"' + b"x" * (3 * MIB) + b'"}')

    server.plan("POST", huge_400)
    with pytest.raises(errors.ApiError) as info:
        make_client(server).post_usage("physics", BODY)
    assert type(info.value) is errors.ApiError  # the status decides: refused for good
    assert info.value.status == 400
    assert len(str(info.value)) < 500


# --- a total deadline --------------------------------------------------------------------------


@pytest.mark.parametrize("dripping", [drip_headers, drip_body], ids=["headers", "body"])
def test_a_dripping_answer_fails_within_the_deadline(
    server: Server, dripping: Callable[[], Behaviour]
) -> None:
    server.plan("POST", dripping())
    client = make_client(server)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown, match="no complete answer within 2 s"):
        client.post_usage("physics", BODY)
    elapsed = time.monotonic() - started
    assert DEADLINE_S - 0.1 <= elapsed < DEADLINE_S + SLACK_S
    assert client.budget.spent_s >= DEADLINE_S - 0.1  # the lost time counts in the retry budget


@pytest.mark.parametrize(
    "unknown",
    [drip_headers, drip_body, lambda: send_huge(ONE_GB, False), lambda: send_huge(ONE_GB, True)],
    ids=["drip-headers", "drip-body", "huge-content-length", "huge-chunked"],
)
def test_deliver_looks_the_key_up_before_posting_again(
    server: Server, unknown: Callable[[], Behaviour]
) -> None:
    server.plan("POST", unknown(), send_json(CREATED))  # a second POST would double-bill
    server.plan("GET", send_json(FOUND_PAGE))
    attempts: list[int] = []
    started = time.monotonic()

    result = deliver(
        make_client(server),
        "physics",
        BODY,
        EVENT_KEY,
        outcome_unknown_before=False,
        before_attempt=attempts.append,
    )

    assert time.monotonic() - started < DEADLINE_S + SLACK_S
    assert result == Delivery("acked", "ue-9", attempts=1, found_by_lookup=True)
    assert attempts == [1]
    assert server.seen == ["POST", "GET"]


def test_abandoned_requests_cannot_pile_up(server: Server) -> None:
    server.plan("POST", drip_headers())
    client = make_client(server, max_request_threads=1)
    with pytest.raises(OutcomeUnknown, match="no complete answer"):
        client.post_usage("physics", BODY)

    # the only request thread still waits for the dripping server: nothing more is sent
    started = time.monotonic()
    with pytest.raises(NotSent, match="still waiting"):
        client.post_usage("physics", BODY)
    assert time.monotonic() - started < DEADLINE_S + SLACK_S
    assert server.seen == ["POST"]

    # once the server gives up, the abandoned thread ends (closing its answer) and frees its slot
    server.plan("POST", send_json(CREATED))
    server.stop.set()
    assert server.answers_done.acquire(timeout=10)
    assert client.post_usage("physics", BODY) == CREATED
    assert server.seen == ["POST", "POST"]


class ClosedResponse(requests.Response):
    """A response that tells when it is closed."""

    def __init__(self, closed: threading.Event) -> None:
        super().__init__()
        self.closed_event = closed

    def close(self) -> None:
        super().close()
        self.closed_event.set()


class HangingSession(requests.Session):
    """A transport whose answer comes only when the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.closed = threading.Event()

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        self.release.wait(10)
        resp = ClosedResponse(self.closed)
        resp.status_code = 200
        resp.raw = io.BytesIO(json.dumps(CREATED).encode())
        return resp


def test_an_abandoned_answer_is_closed_when_it_comes_at_last() -> None:
    session = HangingSession()
    client = AllocationsClient(
        "http://127.0.0.1:9",
        ORG,
        KEY,
        connect_timeout_s=0.2,
        read_timeout_s=0.3,
        session=session,
        sleep=lambda _s: None,
    )
    with pytest.raises(OutcomeUnknown, match=r"within 0\.5 s"):
        client.post_usage("physics", BODY)
    assert not session.closed.is_set()
    session.release.set()
    assert session.closed.wait(5)


def test_request_threads_do_not_outlive_a_normal_answer(server: Server) -> None:
    server.plan("POST", *[send_json(CREATED)] * 20)
    client = make_client(server, max_request_threads=1)
    for _ in range(20):  # one slot only: each request's thread has ended before the next
        assert client.post_usage("physics", BODY) == CREATED
