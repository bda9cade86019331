"""The Allocations API client: the HTTP transport (the exactly-once protocol on top of it is
:mod:`slurm_tracker.delivery`).

The only modules that import ``requests`` and ``tenacity`` are this one's parts, each one job:

- :mod:`slurm_tracker.api_client`: :class:`AllocationsClient`, its endpoints and the checks of
  their answers; one request is one attempt.
- :mod:`slurm_tracker.api_outcomes`: what an attempt came to. Every request is classified by
  what we know of its outcome (see DESIGN.md, "Exactly once over an API without
  idempotency"): :class:`NotSent` (provably never left: resend without a look-up),
  :class:`OutcomeUnknown` (it may have been processed: look the event key up before sending
  again), :class:`RateLimited` (429: wait and resend), :class:`errors.ApiError` (permanent,
  4xx other than 408/429: the event is dead-lettered), :class:`FatalApiError` (permanent but
  not about one event, 401, 403, a redirect, a refused look-up: stop the whole sync; the event
  stays pending).
- :mod:`slurm_tracker.api_retry`: the retry policy (attempts, backoff, Retry-After) and the
  :class:`RetryBudget` of a sync.
- :mod:`slurm_tracker.api_transport`: the exchange of one request, bounded whatever the
  server does: in size (at most :data:`MAX_RESPONSE_BYTES`, 1 MiB, of an answer is read; a
  larger 2xx answer is an :class:`OutcomeUnknown`, a larger error answer keeps its status's
  meaning) and in time (a total deadline of ``connect_timeout + read_timeout`` for the whole
  exchange, headers and body included, in a request thread the caller stops waiting for; at
  most ``max_request_threads`` such threads per client).
- :mod:`slurm_tracker.api_session`: the client's own requests session, which reads the
  environment's proxy and CA settings once and sends each request in one write.

The API key is never logged, shown in a ``repr`` or put in an error message. Where the key
and the base URL come from is :mod:`slurm_tracker.credentials`.

This module is the entry point: it re-exports, on purpose, the names callers have always
imported from ``api`` (the client, the outcomes, the budget, the limits, and the credential
helpers ``load_api_key``, ``derive_base_url``, ``host_from_key``, ``is_loopback`` and the
``*_ENV`` constants, for cli and tests).
"""

from __future__ import annotations

from slurm_tracker.api_client import (
    DELETE_BATCH,
    MAX_PAGES,
    PAGE_SIZE,
    AllocationsClient,
    search_term,
)
from slurm_tracker.api_outcomes import (
    DeliveryFailed,
    FatalApiError,
    NotSent,
    OutcomeUnknown,
    RateLimited,
    RequestFailed,
    parse_retry_after,
)
from slurm_tracker.api_retry import RetryBudget
from slurm_tracker.api_transport import MAX_REQUEST_THREADS, MAX_RESPONSE_BYTES
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

__all__ = [
    "API_KEY_ENV",
    "DELETE_BATCH",
    "KEY_FILE_MAX_BYTES",
    "KEY_PREFIX",
    "MAX_PAGES",
    "MAX_REQUEST_THREADS",
    "MAX_RESPONSE_BYTES",
    "PAGE_SIZE",
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
