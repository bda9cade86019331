"""The Allocations API client: the HTTP transport (the exactly-once protocol on top of it is
:mod:`slurm_tracker.delivery`).

The only module that imports ``requests`` and ``tenacity``. Every request is classified by what
we know of its outcome (see DESIGN.md, "Exactly once over an API without idempotency"):

- :class:`NotSent`: provably never left (connection refused, DNS failure, connect timeout,
  certificate rejected): resend without a look-up.
- :class:`OutcomeUnknown`: it may have been processed (read timeout, connection reset or
  protocol error after sending, 408, 5xx, a 2xx whose body cannot be read): look the event key
  up before sending again.
- :class:`RateLimited`: 429, not processed: wait for ``Retry-After`` and resend.
- :class:`errors.ApiError`: permanent (4xx other than 408/429): the event is dead-lettered.
- :class:`FatalApiError`: permanent but not about one event (401, 403, a redirect, a refused
  look-up): stop the whole sync; the event stays pending.

Every request is bounded, whatever the server does:

- **in size**: at most :data:`MAX_RESPONSE_BYTES` (1 MiB) of an answer is read (streamed, in
  chunks; a larger ``Content-Length`` is refused before reading). A 2xx answer larger than that
  is an :class:`OutcomeUnknown` (the event may have been created: look it up); a larger error
  answer keeps its status's meaning and its message comes from the bytes read.
- **in time**: a total deadline of ``connect_timeout + read_timeout`` for the whole exchange
  (connecting, sending, the status line, the headers and the body), not only per socket read:
  a server dripping a byte every few hundred milliseconds never trips a read timeout. The
  exchange runs in a request thread the caller waits for; past the deadline the request is an
  :class:`OutcomeUnknown` and the thread, left behind, closes its answer when it ends. At most
  ``max_request_threads`` such threads exist per client.

The API key is never logged, shown in a ``repr`` or put in an error message. Where the key
and the base URL come from is :mod:`slurm_tracker.credentials`; its names (``load_api_key``,
``derive_base_url``, ``host_from_key``, ``is_loopback``, the ``*_ENV`` constants) are
re-exported here on purpose, for the callers that import them from ``api`` (cli, tests).
"""

from __future__ import annotations

import codecs
import http.client
import json
import logging
import queue
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote

import requests
import tenacity
import urllib3.exceptions

from slurm_tracker import __version__, errors
from slurm_tracker.config import is_loopback
from slurm_tracker.credentials import (
    API_KEY_ENV,
    KEY_FILE_MAX_BYTES,
    KEY_PREFIX,
    PLATFORM_HOST_ENV,
    derive_base_url,
    host_from_key,
    load_api_key,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_PAGES = 10_000  # a listing never walks more pages than this, whatever the server says
DELETE_BATCH = 100  # at most this many ids in one DELETE request
MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB; a full page of 100 usage events is about 50 KiB
MAX_REQUEST_THREADS = 64  # per client: api.concurrency (at most 32) plus abandoned requests
_CHUNK_BYTES = 64 * 1024

_T = TypeVar("_T")


# --- outcomes ---------------------------------------------------------------------------------


class RequestFailed(errors.ApiUnavailable):
    """A transient failure of one request; the subclass says what we know of its outcome."""

    outcome_unknown = False

    def __init__(self, message: str, retry_after_s: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotSent(RequestFailed):
    """The request provably never left: resend it without a look-up."""


class OutcomeUnknown(RequestFailed):
    """The request may have been processed: look the event up before sending it again."""

    outcome_unknown = True


class RateLimited(RequestFailed):
    """HTTP 429: the request was refused, not processed; wait ``retry_after_s`` (if given)."""


class FatalApiError(errors.ApiError):
    """A permanent refusal that is not about one event (401, 403, a redirect, a refused
    look-up): stop the whole sync and fix the configuration; events stay pending."""


class DeliveryFailed(errors.ApiUnavailable):
    """An event could not be delivered within the attempts and the retry budget; it stays
    pending. ``last_outcome_unknown`` tells whether the last attempt may have landed."""

    def __init__(
        self, message: str, *, event_key: str, last_outcome_unknown: bool, attempts: int
    ) -> None:
        super().__init__(message)
        self.event_key = event_key
        self.last_outcome_unknown = last_outcome_unknown
        self.attempts = attempts


def parse_retry_after(value: Optional[str], now_s: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now_s)


def _classify_exception(exc: requests.RequestException, what: str) -> RequestFailed:
    """Turn a requests exception into NotSent or OutcomeUnknown (conservatively)."""
    reason = _root_reason(exc)
    if isinstance(exc, requests.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.ConnectTimeoutError
    ):
        # NewConnectionError (refused, DNS, unreachable) is a ConnectTimeoutError subclass:
        # the TCP connection was never made, so nothing was sent.
        return NotSent(f"{what}: cannot connect: {_describe(reason)}")
    if isinstance(exc, requests.exceptions.SSLError) and _is_cert_error(reason):
        return NotSent(f"{what}: TLS certificate rejected: {_describe(reason)}")
    if isinstance(exc, requests.ReadTimeout) or isinstance(
        reason, urllib3.exceptions.ReadTimeoutError
    ):  # the second: a read timeout while reading the body
        return OutcomeUnknown(f"{what}: no answer in time (read timeout)")
    return OutcomeUnknown(f"{what}: {type(exc).__name__}: {_describe(reason)}")


def _root_reason(exc: BaseException) -> BaseException:
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, urllib3.exceptions.MaxRetryError) and arg.reason is not None:
        return arg.reason
    if isinstance(arg, BaseException):
        return arg
    return exc


def _is_cert_error(reason: BaseException) -> bool:
    seen: Optional[BaseException] = reason
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        inner = seen.args[0] if seen.args else None
        seen = inner if isinstance(inner, BaseException) else seen.__cause__
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read within the limits: the status, the headers and at most
    ``max_response_bytes`` of the body (``complete`` is False when there was more)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    complete: bool
    limit: int
    encoding: Optional[str] = None


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


def _read_bounded(
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


def _error_from_answer(answer: _Answer, what: str) -> Exception:
    """The exception for a non-2xx answer; the status decides, whatever the body's size."""
    status = answer.status
    if status == 429:
        retry_after = parse_retry_after(answer.headers.get("Retry-After"), time.time())
        return RateLimited(f"{what}: HTTP 429 rate limited", retry_after)
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(answer.headers.get("Retry-After"), time.time())
        message, code = _error_message(answer)
        return OutcomeUnknown(
            f"{what}: HTTP {status}{f' {code}' if code else ''}: {message}", retry_after
        )
    message, code = _error_message(answer)
    if status in (401, 403):
        hint = (
            "the API key was refused: check api.api_key_file / $PW_API_KEY"
            if status == 401
            else "the API key may not write to this organization or allocation"
        )
        return FatalApiError(status, f"{what}: {message} ({hint})", code)
    if 300 <= status < 400:
        location = _clip(answer.headers.get("Location", "?"), 300)
        return FatalApiError(
            status,
            f"{what}: unexpected redirect to {location}: "
            "set api.url to the API's final https:// address",
            code,
        )
    return errors.ApiError(status, f"{what}: {message}", code)


_MAX_DETAILS = 10


def _error_message(answer: _Answer) -> tuple[str, str]:
    """(message, code) from an ``Error`` or problem+json body, else from the status line.

    Only the bytes read within the limit are used, and the message is clipped.
    """
    reason = _clip(answer.reason, 100) or "error"
    body: object = None
    if answer.complete and answer.body:
        try:
            body = json.loads(answer.body)
        except (ValueError, RecursionError):
            body = None
    if isinstance(body, dict):
        code = _clip(body["code"], 100) if isinstance(body.get("code"), str) else ""
        message = body.get("message") or body.get("detail") or body.get("title") or ""
        details = []
        raw_details = body.get("errors")
        for item in raw_details[:_MAX_DETAILS] if isinstance(raw_details, list) else []:
            if isinstance(item, str):
                details.append(_clip(item, 200))
            elif isinstance(item, dict):
                where = _clip(str(item.get("pointer") or item.get("parameter") or ""), 100)
                text = _clip(str(item.get("detail") or item.get("code") or ""), 200)
                details.append(f"{where}: {text}" if where else text)
        text = _clip(str(message), 300) or reason
        if details:
            text += " (" + "; ".join(details) + ")"
        return text, code
    decoded = answer.body[:4096].decode(_codec(answer.encoding), errors="replace")
    text = " ".join(decoded.split())[:200]
    if not answer.complete:
        text += f"... (an answer larger than {answer.limit} bytes; the rest was not read)"
    return (f"{reason}{f': {text}' if text else ''}", "")


def _codec(name: Optional[str]) -> str:
    if not name:
        return "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- retries -----------------------------------------------------------------------------------


class RetryBudget:
    """Seconds one sync may spend on failed attempts and the waits between retries, shared by
    every request of a client (and every thread using it)."""

    def __init__(self, total_s: float) -> None:
        self.total_s = float(total_s)
        self._spent_s = 0.0
        self._lock = threading.Lock()

    @property
    def spent_s(self) -> float:
        with self._lock:
            return self._spent_s

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._spent_s += max(0.0, seconds)

    def allows(self, seconds: float) -> bool:
        with self._lock:
            return self._spent_s + seconds <= self.total_s


class _RetryPlan:
    """Stop and wait policies of one retried operation, for tenacity.

    The wait after attempt n is computed once (full jitter, or the server's Retry-After) and
    used by both the stop test (does the budget allow it?) and the wait itself, whatever order
    the installed tenacity calls them in.
    """

    def __init__(self, client: AllocationsClient) -> None:
        self._client = client
        self._waits: dict[int, float] = {}
        self._jitter = tenacity.wait_random_exponential(
            multiplier=client.backoff_base_s, max=client.backoff_max_s
        )

    def wait_for(self, state: tenacity.RetryCallState) -> float:
        number = state.attempt_number
        if number not in self._waits:
            exc = state.outcome.exception() if state.outcome is not None else None
            retry_after = getattr(exc, "retry_after_s", None)
            if isinstance(retry_after, (int, float)):
                self._waits[number] = float(retry_after)
            else:
                self._waits[number] = float(self._jitter(state))
        return self._waits[number]

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self._client.max_attempts:
            return True
        return not self._client.budget.allows(self.wait_for(state))

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RequestFailed),
            stop=self.stop,
            wait=self.wait_for,
            sleep=self._client._sleep_in_budget,
            before_sleep=_log_retry,
            reraise=True,
        )


def _session(base_url: str) -> requests.Session:
    """A session for ``base_url`` that reads the environment's proxy and CA settings once.

    requests reads them from ``os.environ`` for every request (``trust_env``), a quarter of
    the client's CPU time per request: here they are read once, for the one host this client
    talks to, and kept in the session (the same settings, as the environment does not change
    while the process runs). The connection pool holds as many connections as requests may be
    in flight, so none is opened and dropped again at each request.
    """
    session = requests.Session()
    found = session.merge_environment_settings(base_url, {}, None, None, None)
    session.proxies.update(found.get("proxies") or {})
    session.verify = found.get("verify", True)
    if found.get("cert") is not None:
        session.cert = found["cert"]
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=MAX_REQUEST_THREADS)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.debug("attempt %d failed: %s; retrying in %.1f s", state.attempt_number, exc, wait)


# --- the client --------------------------------------------------------------------------------


class AllocationsClient:
    """The Allocations API of one organization, over HTTP Basic auth with an API key.

    Limits of every request (one attempt):

    - ``connect_timeout_s`` to connect, ``read_timeout_s`` between two bytes of the answer;
    - a total **deadline of** ``connect_timeout_s + read_timeout_s`` for the whole exchange,
      headers and body included (:attr:`deadline_s`): past it the attempt is an
      :class:`OutcomeUnknown` ("no complete answer within N s"), whatever the server still
      sends; the time it took counts in the retry budget like any failed attempt;
    - at most ``max_response_bytes`` (:data:`MAX_RESPONSE_BYTES`, 1 MiB) of the answer's body
      are read; a larger 2xx answer is an :class:`OutcomeUnknown`;
    - at most ``max_request_threads`` exchanges in progress, abandoned ones included (see
      :meth:`_exchange_within_deadline`); when all are taken, a request waits for one until its
      deadline and then fails as :class:`NotSent` (it never left).
    """

    def __init__(
        self,
        base_url: str,
        organization: str,
        api_key: str,
        *,
        connect_timeout_s: float = 10,
        read_timeout_s: float = 30,
        max_attempts: int = 5,
        max_retry_time_s: float = 300,
        requests_per_second: float = 0,
        session: Optional[requests.Session] = None,
        sleep: Callable[[float], None] = time.sleep,
        user_agent: str = f"slurm-tracker/{__version__}",
        clock: Callable[[], float] = time.monotonic,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_request_threads: int = MAX_REQUEST_THREADS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.organization = organization
        self._auth = (api_key, "")
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.deadline_s = connect_timeout_s + read_timeout_s
        self.max_response_bytes = max(0, max_response_bytes)
        self.max_request_threads = max(1, max_request_threads)
        self._request_slots = threading.BoundedSemaphore(self.max_request_threads)
        self._request_threads = _RequestThreads()
        self.max_attempts = max(1, max_attempts)
        self.budget = RetryBudget(max_retry_time_s)
        self.session = session if session is not None else _session(self.base_url)
        self._own_session = session is None  # made by _session: see _prepared
        self._templates: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}
        self._templates_lock = threading.Lock()
        self.user_agent = user_agent
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._clock = clock
        self._interval_s = 1.0 / requests_per_second if requests_per_second > 0 else 0.0
        self._next_request_at = 0.0
        self._rate_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AllocationsClient(base_url={self.base_url!r}, organization={self.organization!r})"

    # -- low level

    def _path(self, *segments: str) -> str:
        org = quote(self.organization, safe="")
        rest = "".join("/" + quote(s, safe="") for s in segments)
        return f"/api/organizations/{org}{rest}"

    def _throttle(self) -> None:
        if not self._interval_s:
            return
        with self._rate_lock:
            now = self._clock()
            wait = self._next_request_at - now
            if wait > 0:
                self._sleep(wait)
            self._next_request_at = max(now, self._next_request_at) + self._interval_s

    def _sleep_in_budget(self, seconds: float) -> None:
        self.budget.spend(seconds)
        self._sleep(seconds)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Optional[Mapping[str, Any]] = None,
        body: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        """One attempt; the decoded JSON of a 2xx answer (None when empty), else raises."""
        what = f"{method} {path}"
        headers = {"User-Agent": self.user_agent, "Accept": "application/json"}
        data = None
        if body is not None:
            data = _encode_json(body)
            headers["Content-Type"] = "application/json"
        self._throttle()
        started = self._clock()
        try:
            log.debug("%s", what)
            answer = self._exchange_within_deadline(what, method, path, params, data, headers)
            if not 200 <= answer.status < 300:
                raise _error_from_answer(answer, what)
            if not answer.complete:
                raise OutcomeUnknown(
                    f"{what}: HTTP {answer.status} with an answer larger than "
                    f"{self.max_response_bytes} bytes (the rest was not read)"
                )
            if not answer.body:
                return None
            try:
                return json.loads(answer.body)
            except (ValueError, RecursionError) as exc:
                raise OutcomeUnknown(
                    f"{what}: HTTP {answer.status} with a body that is not JSON"
                ) from exc
        except RequestFailed:
            self.budget.spend(self._clock() - started)
            raise

    def _exchange_within_deadline(
        self,
        what: str,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]],
        data: Optional[bytes],
        headers: Mapping[str, str],
    ) -> _Answer:
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
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["answer"] = self._exchange(method, path, params, data, headers, abandoned)
            except BaseException as exc:  # handed to the caller, or dropped if it gave up
                outcome["error"] = exc
            finally:
                self._request_slots.release()
                done.set()
                if abandoned.is_set():
                    log.debug("%s: the abandoned request ended: %s", what, outcome.get("error"))

        try:
            self._request_threads.run(work)
        except RuntimeError as exc:  # no thread could be started: nothing was sent
            self._request_slots.release()
            raise NotSent(f"{what}: not sent: cannot start a request thread: {exc}") from exc
        if not done.wait(max(0.0, deadline_at - time.monotonic())):
            abandoned.set()
            raise OutcomeUnknown(
                f"{what}: no complete answer within {self.deadline_s:g} s (the connect and "
                "read timeouts together)"
            )
        error = outcome.get("error")
        if error is None:
            answer: _Answer = outcome["answer"]
            return answer
        if isinstance(error, requests.RequestException):
            raise _classify_exception(error, what) from error
        if isinstance(error, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)):
            # raised by the transport below requests while the body was read
            raise OutcomeUnknown(f"{what}: {type(error).__name__}: {_describe(error)}") from error
        raise error

    def _exchange(
        self,
        method: str,
        path: str,
        params: Optional[Mapping[str, Any]],
        data: Optional[bytes],
        headers: Mapping[str, str],
        abandoned: threading.Event,
    ) -> _Answer:
        """The request and at most ``max_response_bytes`` of its answer (in a request thread).

        The answer is always closed here: released to the pool when read to its end, else its
        connection is closed (the rest of an oversized or abandoned answer is never read).
        """
        if self._own_session and not params and not self.session.cookies:
            resp = self.session.send(
                self._prepared(method, path, data, headers),
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        else:
            resp = self.session.request(
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
            body, complete = _read_bounded(resp, self.max_response_bytes, abandoned)
            return _Answer(
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

    def _prepared(
        self, method: str, path: str, data: Optional[bytes], headers: Mapping[str, str]
    ) -> requests.PreparedRequest:
        """The request as ``Session.request`` would prepare it, from a template made once per
        method, path and headers (URL, session headers, authorization): only the body is set
        for each request. Preparing every request anew was a quarter of the client's time per
        POST. Only for the client's own session (:func:`_session`, which reads no environment
        per request) and requests without query parameters or cookies to send."""
        key = (method, path, tuple(headers.items()))
        with self._templates_lock:
            template = self._templates.get(key)
            if template is None:
                request = requests.Request(
                    method, self.base_url + path, headers=dict(headers), auth=self._auth
                )
                template = self.session.prepare_request(request)
                if len(self._templates) < 256:  # one per allocation and method, in practice
                    self._templates[key] = template
        prepared: requests.PreparedRequest = template.copy()
        prepared.prepare_body(data, None)
        return prepared

    def with_retries(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation`` again after each :class:`RequestFailed` it raises, with this
        client's policy: at most ``max_attempts`` calls, full-jitter exponential backoff (or
        the server's Retry-After) between them, all within the retry budget; the last failure
        is raised. Anything else ``operation`` raises or returns ends it at once. For reads
        and idempotent writes, and for the delivery protocol (which decides inside
        ``operation`` whether to look an event up or to post it)."""
        for attempt in _RetryPlan(self).retrying():
            with attempt:
                return operation()
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    # -- endpoints

    def post_usage(self, allocation: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create one usage event: ONE attempt, no retry. Returns ``UsageEventOutput``."""
        path = self._path("allocations", allocation, "usage")
        result = self._request("POST", path, body=body)
        if not isinstance(result, dict) or not isinstance(result.get("id"), str):
            raise OutcomeUnknown(f"POST {path}: the answer has no event id")
        return result

    def find_usage(self, allocation: str, event_key: str) -> Optional[dict[str, Any]]:
        """The usage event (``RatedCostWithMetadata``) whose ``metadata.eventKey`` is exactly
        ``event_key``, or None. Transient failures are retried."""
        return self._search_usage(allocation, event_key, retried=True)

    def lookup_usage(self, allocation: str, event_key: str) -> Optional[dict[str, Any]]:
        """Like :meth:`find_usage`, with ONE attempt per page: a transient failure raises
        (:class:`RequestFailed`). For callers that retry the look-up together with what
        follows it (``delivery.deliver`` retries look-up and POST as one step)."""
        return self._search_usage(allocation, event_key, retried=False)

    def _search_usage(
        self, allocation: str, event_key: str, *, retried: bool
    ) -> Optional[dict[str, Any]]:
        """The server's ``metadata`` search is a case-insensitive substring match: every hit is
        checked for the exact key here."""
        params = {"metadata": search_term(event_key)}
        for item in self._walk_usage(allocation, params, PAGE_SIZE, retried=retried):
            meta = item.get("metadata")
            if isinstance(meta, dict) and meta.get("eventKey") == event_key:
                return item
        return None

    def iter_usage(
        self,
        allocation: str,
        *,
        metadata: Optional[str] = None,
        started_from: Optional[datetime] = None,
        started_to: Optional[datetime] = None,
        ended_from: Optional[datetime] = None,
        ended_to: Optional[datetime] = None,
        created_from: Optional[datetime] = None,
        created_to: Optional[datetime] = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Every usage event (``RatedCostWithMetadata``, as a dict) of ``allocation`` that the
        list endpoint's filters select, page after page.

        The filters are the contract's, all bounds inclusive: ``metadata`` is a
        case-insensitive substring of the metadata's JSON text (check what you find: see
        :func:`search_term`); ``started_from``/``started_to`` bound ``startedAt``,
        ``ended_*`` ``endedAt`` and ``created_*`` ``createdAt`` (aware datetimes, sent in
        UTC). Arguments are checked now (ValueError); the requests are made as the items are
        consumed, one page at a time, each retried like every read. A refusal (404 for an
        unknown allocation, ...) raises :class:`errors.ApiError` (:class:`FatalApiError` for
        401/403) while iterating. The walk stops at ``totalPages``, at an empty page, or after
        :data:`MAX_PAGES` pages (logged as a warning).

        Pages are addressed by number: events created or deleted during the walk may shift
        items between pages (an item seen twice or not at all). Collect the ids first, then
        delete them.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        params: dict[str, str] = {}
        if metadata:
            params["metadata"] = metadata
        bounds = (
            ("startedAtFrom", started_from),
            ("startedAtTo", started_to),
            ("endedAtFrom", ended_from),
            ("endedAtTo", ended_to),
            ("createdAtFrom", created_from),
            ("createdAtTo", created_to),
        )
        for name, value in bounds:
            if value is not None:
                params[name] = _utc_text(value, name)
        return self._walk_usage(allocation, params, page_size, retried=True)

    def _walk_usage(
        self, allocation: str, filters: Mapping[str, str], page_size: int, *, retried: bool
    ) -> Iterator[dict[str, Any]]:
        """The items of the list endpoint's pages for ``filters`` (a generator)."""
        path = self._path("allocations", allocation, "usage")
        for page in range(1, MAX_PAGES + 1):
            params = {**filters, "page": page, "pageSize": page_size}

            def get(params: Mapping[str, Any] = params) -> Any:
                return self._request("GET", path, params=params)

            data = self.with_retries(get) if retried else get()
            items = data.get("items") if isinstance(data, dict) else None
            if not isinstance(data, dict) or not isinstance(items, (list, type(None))):
                raise OutcomeUnknown(f"GET {path}: the answer is not a page of usage events")
            for item in items or []:
                if isinstance(item, dict):
                    yield dict(item)
            total_pages = data.get("totalPages")
            if not items or not isinstance(total_pages, int) or page >= total_pages:
                return
        log.warning(
            "GET %s: stopped after %d pages of %d usage events; the API says there are more",
            path,
            MAX_PAGES,
            page_size,
        )

    def get_allocation(self, name: str) -> dict[str, Any]:
        path = self._path("allocations", name)
        return _expect(dict, self.with_retries(lambda: self._request("GET", path)), path)

    def list_units(self) -> list[dict[str, Any]]:
        path = self._path("units")
        return _expect_list(self.with_retries(lambda: self._request("GET", path)), path)

    def list_skus(self, unit: str, *, include_archived: bool = False) -> list[dict[str, Any]]:
        """The SKUs of a unit; archived (soft-deleted) ones too with ``include_archived``."""
        path = self._path("units", unit, "skus")
        params = {"includeArchived": "true"} if include_archived else None
        answer = self.with_retries(lambda: self._request("GET", path, params=params))
        return _expect_list(answer, path)

    def list_sku_rules(self, unit: str, sku: str) -> list[dict[str, Any]]:
        """The rate history of a SKU; the contract names the path parameter "SKU ID": pass the
        SKU's ``id`` from :meth:`list_skus`."""
        path = self._path("units", unit, "skus", sku, "rules")
        return _expect_list(self.with_retries(lambda: self._request("GET", path)), path)

    def delete_usage(self, allocation: str, ids: Sequence[str]) -> int:
        """Delete usage events by the ``id`` of their list items (the rated cost ids, not
        ``usageEventId``); returns the API's ``deleted`` count (ids that existed).

        At most :data:`DELETE_BATCH` ids go in one request (several requests for more; none
        for no ids). Each request is retried on transient failures: deleting an id that is
        already gone is harmless. So after an attempt whose outcome was unknown the count can
        be lower than the number of events removed (the lost attempt removed some): list again
        to know what the API holds.
        """
        path = self._path("allocations", allocation, "usage")
        wanted = list(ids)
        deleted = 0
        for start in range(0, len(wanted), DELETE_BATCH):
            body = {"ids": wanted[start : start + DELETE_BATCH]}

            def delete(body: Mapping[str, Any] = body) -> int:
                return _deleted_count(self._request("DELETE", path, body=body), path)

            deleted += self.with_retries(delete)
        return deleted


def _expect(kind: type[_T], value: object, path: str) -> _T:
    if not isinstance(value, kind):
        raise OutcomeUnknown(f"GET {path}: unexpected answer of type {type(value).__name__}")
    return value


def _deleted_count(value: object, path: str) -> int:
    """``deleted`` of a ``DeleteRatedCostsResponseBody``; an answer without it is unknown."""
    count = value.get("deleted") if isinstance(value, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise OutcomeUnknown(f"DELETE {path}: the answer has no deleted count")
    return count


def _expect_list(value: object, path: str) -> list[dict[str, Any]]:
    if value is None:  # the contract allows null for an empty list
        return []
    items = _expect(list, value, path)
    return [dict(item) for item in items if isinstance(item, dict)]


def search_term(event_key: str) -> str:
    """What to pass to the list endpoint's ``metadata`` filter to find ``event_key``.

    The server searches the JSON text of the metadata, where characters such as ``"``, ``\\``,
    ``<`` or non-ASCII letters may be escaped; so only the longest run of characters that JSON
    never escapes is searched for, and the exact key is checked on our side.
    """
    runs = re.findall(r"[A-Za-z0-9:._+@=,; -]+", event_key)
    longest = max(runs, key=len, default="")
    return event_key if longest == event_key else longest


def _encode_json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, default=_json_default, allow_nan=False, separators=(",", ":")).encode()


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"cannot send the non-finite number {value}")
        return float(value)
    if isinstance(value, datetime):
        return _utc_text(value)
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def _utc_text(value: datetime, what: str = "") -> str:
    """RFC 3339 in UTC (``2026-03-01T00:00:00Z``, fractions only when present)."""
    as_what = f" as {what}" if what else ""
    if not isinstance(value, datetime):
        raise TypeError(f"cannot send a {type(value).__name__}{as_what}: give a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"cannot send the naive datetime {value.isoformat()}{as_what}")
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


__all__ = [
    "API_KEY_ENV",
    "KEY_FILE_MAX_BYTES",
    "KEY_PREFIX",
    "PLATFORM_HOST_ENV",
    "AllocationsClient",
    "DeliveryFailed",
    "FatalApiError",
    "NotSent",
    "OutcomeUnknown",
    "RateLimited",
    "RequestFailed",
    "RetryBudget",
    "derive_base_url",
    "host_from_key",
    "is_loopback",
    "load_api_key",
    "parse_retry_after",
    "search_term",
]
