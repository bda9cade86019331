"""The Allocations API client: its endpoints, and what their answers must be.

Part of the API client (:mod:`slurm_tracker.api` is its entry point and re-exports these
names; the exactly-once protocol on top of it is :mod:`slurm_tracker.delivery`). One request
is one attempt (:meth:`AllocationsClient._request`): its JSON body is encoded here, it is
exchanged by the :class:`~slurm_tracker.api_transport.Transport` within its limits of size and
time, a non-2xx answer or a failure is classified (:mod:`slurm_tracker.api_outcomes`), and a
2xx answer is decoded and checked for the shape the endpoint promises (an answer that is not
is an :class:`OutcomeUnknown`). Reads and idempotent writes are retried with the client's
policy (:mod:`slurm_tracker.api_retry`); a POST of a usage event never is, here.

The API key is never logged, shown in a ``repr`` or put in an error message.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote

import requests

from slurm_tracker import __version__
from slurm_tracker.api_outcomes import OutcomeUnknown, RequestFailed, error_from_answer
from slurm_tracker.api_retry import RetryBudget, run_with_retries
from slurm_tracker.api_transport import MAX_REQUEST_THREADS, MAX_RESPONSE_BYTES, Transport

log = logging.getLogger("slurm_tracker.api")  # the name the client's logs have always carried

PAGE_SIZE = 100
MAX_PAGES = 10_000  # a listing never walks more pages than this, whatever the server says
DELETE_BATCH = 100  # at most this many ids in one DELETE request

_T = TypeVar("_T")


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
      :meth:`Transport.exchange <slurm_tracker.api_transport.Transport.exchange>`); when all
      are taken, a request waits for one until its deadline and then fails as
      :class:`~slurm_tracker.api_outcomes.NotSent` (it never left).
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
        self._transport = Transport(
            self.base_url,
            api_key,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            session=session,
            max_response_bytes=max_response_bytes,
            max_request_threads=max_request_threads,
        )
        self.max_attempts = max(1, max_attempts)
        self.budget = RetryBudget(max_retry_time_s)
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

    # -- the transport's settings

    @property
    def session(self) -> requests.Session:
        return self._transport.session

    @property
    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts of one request, in seconds."""
        return self._transport.timeout

    @property
    def deadline_s(self) -> float:
        """The most one exchange may take, headers and body included."""
        return self._transport.deadline_s

    @property
    def max_response_bytes(self) -> int:
        return self._transport.max_response_bytes

    @property
    def max_request_threads(self) -> int:
        return self._transport.max_request_threads

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
            answer = self._transport.exchange(what, method, path, params, data, headers)
            if not 200 <= answer.status < 300:
                raise error_from_answer(answer, what)
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

    def with_retries(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation`` again after each :class:`RequestFailed` it raises, with this
        client's policy: at most ``max_attempts`` calls, full-jitter exponential backoff (or
        the server's Retry-After) between them, all within the retry budget; the last failure
        is raised. Anything else ``operation`` raises or returns ends it at once. For reads
        and idempotent writes, and for the delivery protocol (which decides inside
        ``operation`` whether to look an event up or to post it)."""
        return run_with_retries(
            operation,
            max_attempts=self.max_attempts,
            budget=self.budget,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            sleep=self._sleep,
        )

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


__all__ = ["DELETE_BATCH", "MAX_PAGES", "PAGE_SIZE", "AllocationsClient", "search_term"]
