"""The HTTP transport of the API client: the exchange of one request and its limits in size
and time.

Part of the API client (:mod:`slurm_tracker.api` re-exports :data:`MAX_RESPONSE_BYTES` and
:data:`MAX_REQUEST_THREADS`). Every exchange is bounded, whatever the server does:

- **in size**: at most ``max_response_bytes`` (:data:`MAX_RESPONSE_BYTES`, 1 MiB) of an answer
  is read (streamed, in chunks; a larger ``Content-Length`` is refused before reading). The
  :class:`~slurm_tracker.api_outcomes.Answer` says whether that was all of it; what a cut
  answer means is the caller's to judge.
- **in time**: a total deadline of ``connect_timeout + read_timeout`` for the whole exchange
  (connecting, sending, the status line, the headers and the body), not only per socket read:
  a server dripping a byte every few hundred milliseconds never trips a read timeout. The
  exchange runs in a request thread the caller waits for; past the deadline the request is an
  :class:`~slurm_tracker.api_outcomes.OutcomeUnknown` and the thread, left behind, closes its
  answer when it ends. At most ``max_request_threads`` such threads exist per client.

Cost per request (the agent sends thousands per sync): the client's own session
(:mod:`slurm_tracker.api_session`) reads the environment's proxy and CA settings once; its
requests are prepared from a template per method, path and headers and handed to the
session's adapter directly, not through ``Session.send`` (cookies the server sets are kept
and sent back as ``Session.send`` would). A session given by the caller is used through
``Session.request``, as it is.
"""

from __future__ import annotations

import _thread
import http.client
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import requests
import requests.cookies
import urllib3.exceptions

from slurm_tracker.api_outcomes import (
    Answer,
    NotSent,
    OutcomeUnknown,
    classify_exception,
    describe,
)
from slurm_tracker.api_session import build_session

log = logging.getLogger("slurm_tracker.api")  # the name the client's logs have always carried

MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB; a full page of 100 usage events is about 50 KiB
MAX_REQUEST_THREADS = 64  # per client: api.concurrency (at most 32) plus abandoned requests
_CHUNK_BYTES = 64 * 1024
_MAX_TEMPLATES = 256  # one per allocation and method, in practice


# --- request threads ---------------------------------------------------------------------------


class _RequestThreads:
    """Daemon threads that run request exchanges, each reused for the next request once its
    exchange has ended (starting a thread per request, and waiting for it to start, was a
    fifth of the client's time per request). A thread is started only when none is idle, so
    there are never more threads than the most exchanges in progress at once (at most the
    client's request slots)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` in a request thread; RuntimeError when no thread can be started."""
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        if not reuse:
            threading.Thread(target=self._serve, name="slurm-tracker-request", daemon=True).start()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            self._jobs.get()()  # a job never raises (it hands its outcome to its caller)
            with self._lock:
                self._idle += 1


class _Abandoned(Exception):
    """Raised in a request thread whose caller gave up waiting (past the deadline)."""


def read_bounded(
    resp: requests.Response, limit: int, abandoned: threading.Event
) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a streamed body, and whether that was all of it.

    A ``Content-Length`` above the limit is refused without reading; otherwise the body is read
    in chunks and reading stops at the first chunk past the limit (the caller closes the
    connection, so the rest is never received). ``resp.content``, ``.text`` and ``.json()``
    would read everything first.
    """
    declared = resp.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(chunk_size=_CHUNK_BYTES):
        if abandoned.is_set():
            raise _Abandoned
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])  # the start, for an error message
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), True


# --- the transport -----------------------------------------------------------------------------


class Transport:
    """The HTTP exchanges of one client with the API at ``base_url`` (see the module's
    docstring for the limits)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        session: Optional[requests.Session],
        max_response_bytes: int,
        max_request_threads: int,
    ) -> None:
        self.base_url = base_url
        self._auth = (api_key, "")
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.deadline_s = connect_timeout_s + read_timeout_s
        self.max_response_bytes = max(0, max_response_bytes)
        self.max_request_threads = max(1, max_request_threads)
        self._request_slots = threading.BoundedSemaphore(self.max_request_threads)
        self._request_threads = _RequestThreads()
        own = session is None
        if session is None:
            session = build_session(base_url, pool_size=MAX_REQUEST_THREADS)
        self.session = session
        self._own_session = own  # made by build_session: see _prepare and _send
        self._templates: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}
        self._templates_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    def exchange(
        self,
        what: str,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]],
        data: Optional[bytes],
        headers: Mapping[str, str],
    ) -> Answer:
        """Run :meth:`_exchange` in a request thread and wait for it at most :attr:`deadline_s`.

        Why a thread: requests' timeouts apply to each socket operation, and http.client reads
        the status line and headers itself, one buffered line at a time; a server sending a
        byte every few hundred milliseconds keeps every read within the timeout for as long as
        it likes, in the headers as in the body. Only a caller that stops waiting bounds the
        whole exchange. The abandoned thread cannot be killed: it stops at its next body chunk,
        or when the server gives up or its socket times out, and closes its answer itself (in
        :meth:`_exchange`). Request threads are daemons (they never hold the process at exit),
        reused once their exchange has ended (:class:`_RequestThreads`), and each exchange holds
        one of ``max_request_threads`` slots until it ends, so abandoned ones cannot pile up.
        """
        deadline_at = time.monotonic() + self.deadline_s
        if not self._request_slots.acquire(timeout=self.deadline_s):
            raise NotSent(
                f"{what}: not sent: {self.max_request_threads} earlier requests are still "
                "waiting for the API's answer"
            )
        abandoned = threading.Event()
        done = _thread.allocate_lock()  # released by the request thread when it has ended
        done.acquire()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["answer"] = self._exchange(method, path, params, data, headers, abandoned)
            except BaseException as exc:  # handed to the caller, or dropped if it gave up
                outcome["error"] = exc
            finally:
                self._request_slots.release()
                done.release()
                if abandoned.is_set():
                    log.debug("%s: the abandoned request ended: %s", what, outcome.get("error"))

        try:
            self._request_threads.run(work)
        except RuntimeError as exc:  # no thread could be started: nothing was sent
            self._request_slots.release()
            raise NotSent(f"{what}: not sent: cannot start a request thread: {exc}") from exc
        if not done.acquire(timeout=max(0.0, deadline_at - time.monotonic())):
            abandoned.set()
            raise OutcomeUnknown(
                f"{what}: no complete answer within {self.deadline_s:g} s (the connect and "
                "read timeouts together)"
            )
        error = outcome.get("error")
        if error is None:
            answer: Answer = outcome["answer"]
            return answer
        if isinstance(error, requests.RequestException):
            raise classify_exception(error, what) from error
        if isinstance(error, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)):
            # raised by the transport below requests while the body was read
            raise OutcomeUnknown(f"{what}: {type(error).__name__}: {describe(error)}") from error
        raise error

    def _exchange(
        self,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]],
        data: Optional[bytes],
        headers: Mapping[str, str],
        abandoned: threading.Event,
    ) -> Answer:
        """The request and at most ``max_response_bytes`` of its answer (in a request thread).

        The answer is always closed here: released to the pool when read to its end, else its
        connection is closed (the rest of an oversized or abandoned answer is never read).
        """
        session = self.session
        if self._own_session and not session.hooks.get("response"):
            resp = self._send(self._prepare(method, path, params, data, headers))
        else:
            resp = session.request(
                method,
                self.base_url + path,
                params=params,
                data=data,
                headers=headers,
                auth=self._auth,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        try:
            body, complete = read_bounded(resp, self.max_response_bytes, abandoned)
            return Answer(
                status=resp.status_code,
                reason=resp.reason or "",
                headers=resp.headers,
                body=body,
                complete=complete,
                limit=self.max_response_bytes,
                encoding=resp.encoding,
            )
        finally:
            resp.close()

    def _prepare(
        self,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]],
        data: Optional[bytes],
        headers: Mapping[str, str],
    ) -> requests.PreparedRequest:
        """The request as ``Session.request`` prepares it, for the client's own session.

        While the session holds no cookie, from a template made once per method, path and
        headers (URL, session headers, authorization): only the query and the body are set for
        each request (preparing every request anew was a quarter of the client's time per
        POST). Once the server has set a cookie, every request is prepared anew: its
        ``Cookie`` header depends on the cookies held then.
        """
        session = self.session
        if session.cookies:
            request = requests.Request(
                method,
                self.base_url + path,
                headers=dict(headers),
                params=params,
                data=data,
                auth=self._auth,
            )
            return session.prepare_request(request)
        key = (method, path, tuple(headers.items()))
        template = self._templates.get(key)
        if template is None:
            request = requests.Request(
                method, self.base_url + path, headers=dict(headers), auth=self._auth
            )
            template = session.prepare_request(request)
            with self._templates_lock:
                if len(self._templates) < _MAX_TEMPLATES:
                    self._templates[key] = template
        prepared: requests.PreparedRequest = template.copy()
        if params:
            prepared.prepare_url(self.base_url + path, params)
        prepared.prepare_body(data, None)
        return prepared

    def _send(self, prepared: requests.PreparedRequest) -> requests.Response:
        """What ``Session.send(prepared, allow_redirects=False, stream=True)`` answers, for the
        client's own session (``build_session``: no environment to read, no hooks), with
        less work and one difference:

        - the request goes to the session's adapter directly, with the session's TLS settings
          and proxies (what ``Session.send`` passes), and a cookie the answer sets is stored in
          the session as ``Session.send`` stores it;
        - the answer is never read here: ``Session.send`` reads a redirect's whole body, without
          any limit (to follow it, even when told not to); here it is read like any answer,
          within the limit (and refused: ``api.url`` must be the API's final address).
        """
        session = self.session
        adapter = session.get_adapter(prepared.url or "")
        verify: Any = session.verify  # passed as Session.send passes it
        resp = adapter.send(
            prepared,
            stream=True,
            timeout=self.timeout,
            verify=verify,
            cert=session.cert,
            proxies=session.proxies,
        )
        if "set-cookie" in resp.headers or "set-cookie2" in resp.headers:
            requests.cookies.extract_cookies_to_jar(  # type: ignore[no-untyped-call]
                session.cookies, prepared, resp.raw
            )
        return resp


__all__ = [
    "MAX_REQUEST_THREADS",
    "MAX_RESPONSE_BYTES",
    "Transport",
    "read_bounded",
]
