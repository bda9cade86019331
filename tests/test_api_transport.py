"""The API client's transport (slurm_tracker/api_transport.py) against real local servers:
what the environment's proxy and CA settings do, TLS verification, connection pools, and
that the short path of the client's own session sends what ``Session.request`` sends.

The client reads ``HTTP(S)_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE`` once, when it is
built, and sends its requests to the session's adapter directly (not through
``Session.send``): these tests pin down that the requests still go where, and are verified as,
requests would send and verify them.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import responses

from slurm_tracker.api import AllocationsClient, FatalApiError, NotSent, OutcomeUnknown

ORG = "acme"
KEY = "pwt_eA.not-a-real-secret"
BODY: dict[str, Any] = {
    "sku": "CPU_HOUR",
    "quantity": 1.5,
    "startedAt": "2026-03-01T00:00:00Z",
    "endedAt": "2026-03-01T01:00:00Z",
    "metadata": {"eventKey": "st1:c:1:100:0-3600:CPU_HOUR"},
}
CREATED = {"id": "ue-1", "organization": ORG, "allocation": "physics", "quantity": 1.5}
USAGE_PATH = f"/api/organizations/{ORG}/allocations/physics/usage"
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# --- a server that answers every request with CREATED and remembers its request line ----------


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: Optional[ssl.SSLContext] = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lines: list[str] = []  # "METHOD target" of each request
        self.connections = 0
        self.lock = threading.Lock()
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client refusing the certificate, or closing early, is what some tests do."""

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        with self.server.lock:
            self.server.lines.append(f"POST {self.path}")
        data = json.dumps(CREATED).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serving(context: Optional[ssl.SSLContext] = None) -> Iterator[Server]:
    server = Server(context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def api() -> Iterator[Server]:
    yield from serving()


@pytest.fixture
def proxy() -> Iterator[Server]:
    yield from serving()


def post(client: AllocationsClient) -> dict[str, Any]:
    return client.post_usage("physics", BODY)


# --- proxies -----------------------------------------------------------------------------------


def test_the_environment_proxy_carries_the_requests(
    monkeypatch: pytest.MonkeyPatch, api: Server, proxy: Server
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    assert post(client) == CREATED
    assert post(client) == CREATED
    # through a proxy, an http:// request names its whole URL
    assert proxy.lines == [f"POST http://127.0.0.1:{api.port}{USAGE_PATH}"] * 2
    assert api.lines == []


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "*"])
def test_no_proxy_sends_the_requests_directly(
    monkeypatch: pytest.MonkeyPatch, api: Server, proxy: Server, no_proxy: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    assert post(client) == CREATED
    assert api.lines == [f"POST {USAGE_PATH}"]
    assert proxy.lines == []


def test_the_proxy_settings_are_those_of_when_the_client_was_built(
    monkeypatch: pytest.MonkeyPatch, api: Server, proxy: Server
) -> None:
    direct = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    proxied = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    monkeypatch.delenv("HTTP_PROXY")
    assert post(direct) == CREATED
    assert post(proxied) == CREATED
    assert api.lines == [f"POST {USAGE_PATH}"]
    assert proxy.lines == [f"POST http://127.0.0.1:{api.port}{USAGE_PATH}"]


# --- connection pools --------------------------------------------------------------------------


def test_connections_are_reused(api: Server) -> None:
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    for _ in range(5):
        assert post(client) == CREATED
    assert len(api.lines) == 5
    assert api.connections == 1  # one connection served the five requests


def test_a_closed_session_opens_new_connections(api: Server) -> None:
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    assert post(client) == CREATED
    client.session.close()  # drops its connection pools, as requests does
    assert post(client) == CREATED
    assert len(api.lines) == 2
    assert api.connections == 2  # a new pool, a new connection


def test_a_request_is_sent_in_one_write(monkeypatch: pytest.MonkeyPatch, api: Server) -> None:
    # the header block and the body together: one system call, one segment, one wake-up
    writes: list[bytes] = []
    send = http.client.HTTPConnection.send

    def recording(self: http.client.HTTPConnection, data: Any) -> None:
        writes.append(bytes(data))
        send(self, data)

    monkeypatch.setattr(http.client.HTTPConnection, "send", recording)
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    assert post(client) == CREATED
    assert post(client) == CREATED
    assert len(writes) == 2
    for data in writes:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"POST " + USAGE_PATH.encode() + b" HTTP/1.1\r\n")
        assert json.loads(body) == BODY
        assert f"Content-Length: {len(body)}".encode() in head
    assert api.lines == [f"POST {USAGE_PATH}"] * 2


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` (only), and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_api(certificate: tuple[Path, Path]) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    yield from serving(context)


def test_a_certificate_no_trusted_authority_signed_is_refused(tls_api: Server) -> None:
    client = AllocationsClient(f"https://localhost:{tls_api.port}", ORG, KEY, max_attempts=1)
    with pytest.raises(NotSent, match="TLS certificate rejected"):
        post(client)
    assert tls_api.lines == []


def test_the_ca_bundle_of_the_environment_is_trusted(
    monkeypatch: pytest.MonkeyPatch, tls_api: Server, certificate: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    client = AllocationsClient(f"https://localhost:{tls_api.port}", ORG, KEY)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # read once, when the client was built
    assert post(client) == CREATED
    assert post(client) == CREATED
    assert tls_api.lines == [f"POST {USAGE_PATH}"] * 2


def test_a_certificate_for_another_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, tls_api: Server, certificate: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    # trusted, but for "localhost": 127.0.0.1 is not a name it was issued for
    client = AllocationsClient(f"https://127.0.0.1:{tls_api.port}", ORG, KEY, max_attempts=1)
    with pytest.raises(NotSent, match="TLS certificate rejected"):
        post(client)
    assert tls_api.lines == []


def test_a_ca_bundle_set_after_the_client_was_built_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tls_api: Server, certificate: tuple[Path, Path]
) -> None:
    client = AllocationsClient(f"https://localhost:{tls_api.port}", ORG, KEY, max_attempts=1)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    with pytest.raises(NotSent, match="TLS certificate rejected"):
        post(client)


# --- the short path sends what Session.request sends -------------------------------------------


BASE = "https://api.example.test"


def exercise(client: AllocationsClient) -> None:
    """A POST, GETs with queries (characters that need quoting), a DELETE with a body."""
    client.post_usage("physics", BODY)
    client.find_usage("physics", "st1:c:1:100:0-3600:CPU_HOUR")
    list(client.iter_usage("physics", metadata='a "quoted" & odd/ key', page_size=7))
    client.list_skus("unit one", include_archived=True)
    client.delete_usage("physics", ["rc-1", "rc-2"])


def sent(session: Optional[requests.Session], cookie: bool) -> list[tuple[Any, ...]]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        usage = f"{BASE}{USAGE_PATH}"
        # a load balancer's sticky-session cookie: sent back with every later request
        set_cookie = {"Set-Cookie": "lb=node-7; Path=/"} if cookie else {}
        mock.add(responses.POST, usage, json=CREATED, headers=set_cookie)
        mock.add(responses.GET, usage, json={"items": [], "total": 0, "page": 1, "totalPages": 0})
        mock.add(responses.DELETE, usage, json={"deleted": 2})
        mock.add(responses.GET, f"{BASE}/api/organizations/{ORG}/units/unit%20one/skus", json=[])
        client = AllocationsClient(BASE, ORG, KEY, session=session, sleep=lambda _s: None)
        exercise(client)
        return [
            (
                call.request.method,
                call.request.url,
                sorted(call.request.headers.items()),
                call.request.body,
            )
            for call in mock.calls
        ]


@pytest.mark.parametrize("cookie", [False, True], ids=["no-cookie", "cookie"])
def test_the_own_session_sends_what_session_request_sends(cookie: bool) -> None:
    given = requests.Session()  # a caller's session: every request through Session.request
    given.trust_env = False
    ours = sent(None, cookie)
    assert len(ours) == 5
    assert ours == sent(given, cookie)
    with_cookie = [dict(headers).get("Cookie") for _, _, headers, _ in ours]
    assert with_cookie == [None] + ["lb=node-7" if cookie else None] * 4


def test_a_redirect_is_refused_for_every_request() -> None:
    with responses.RequestsMock() as mock:
        mock.add(
            responses.POST,
            f"{BASE}{USAGE_PATH}",
            status=308,
            headers={"Location": "https://elsewhere.test/x"},
            body=b"moved " * 1000,
        )
        client = AllocationsClient(BASE, ORG, KEY, sleep=lambda _s: None)
        with pytest.raises(FatalApiError, match=re.escape("redirect to https://elsewhere.test/x")):
            post(client)
        assert len(mock.calls) == 1  # never followed


def test_an_answer_that_breaks_off_is_outcome_unknown(api: Server) -> None:
    class Short(Handler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"id": "ue-1"')  # then the connection closes
            self.close_connection = True

    api.RequestHandlerClass = Short
    client = AllocationsClient(f"http://127.0.0.1:{api.port}", ORG, KEY)
    with pytest.raises(OutcomeUnknown):
        post(client)
