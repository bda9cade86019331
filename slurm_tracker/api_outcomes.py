"""What one request to the Allocations API came to: the classification of its failures.

Part of the API client (:mod:`slurm_tracker.api` re-exports these names). Every request is
classified by what we know of its outcome (see DESIGN.md, "Exactly once over an API without
idempotency"):

- :class:`NotSent`: provably never left (connection refused, DNS failure, connect timeout,
  certificate rejected): resend without a look-up.
- :class:`OutcomeUnknown`: it may have been processed (read timeout, connection reset or
  protocol error after sending, 408, 5xx, a 2xx whose body cannot be read): look the event key
  up before sending again.
- :class:`RateLimited`: 429, not processed: wait for ``Retry-After`` and resend.
- :class:`errors.ApiError`: permanent (4xx other than 408/429): the event is dead-lettered.
- :class:`FatalApiError`: permanent but not about one event (401, 403, a redirect, a refused
  look-up): stop the whole sync; the event stays pending.

:func:`classify_exception` judges a failure of the transport (a ``requests`` exception),
:func:`error_from_answer` a non-2xx :class:`Answer`; an error message is built from the bytes
read within the size limit only, and clipped. The API key is never part of a message.
"""

from __future__ import annotations

import codecs
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Optional

import requests
import urllib3.exceptions
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

from slurm_tracker import errors


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


def classify_exception(exc: requests.RequestException, what: str) -> RequestFailed:
    """Turn a requests exception into NotSent or OutcomeUnknown (conservatively)."""
    reason = _root_reason(exc)
    if isinstance(exc, requests.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.ConnectTimeoutError
    ):
        # NewConnectionError (refused, DNS, unreachable) is a ConnectTimeoutError subclass:
        # the TCP connection was never made, so nothing was sent.
        return NotSent(f"{what}: cannot connect: {describe(reason)}")
    if isinstance(exc, requests.exceptions.SSLError) and _is_cert_error(reason):
        return NotSent(f"{what}: TLS certificate rejected: {describe(reason)}")
    if isinstance(exc, requests.ReadTimeout) or isinstance(
        reason, urllib3.exceptions.ReadTimeoutError
    ):  # the second: a read timeout while reading the body
        return OutcomeUnknown(f"{what}: no answer in time (read timeout)")
    return OutcomeUnknown(f"{what}: {type(exc).__name__}: {describe(reason)}")


def _root_reason(exc: BaseException) -> BaseException:
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, urllib3.exceptions.MaxRetryError) and arg.reason is not None:
        return arg.reason
    if isinstance(arg, BaseException):
        return arg
    return exc


def _is_cert_error(reason: BaseException) -> bool:
    """Whether the server's certificate was refused: by the TLS library, or (urllib3 1.x,
    which checks the host name itself) because it names another host. Either way the
    handshake ended before any byte of the request was sent."""
    seen: Optional[BaseException] = reason
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, (ssl.SSLCertVerificationError, HostnameMismatch)):
            return True
        inner = seen.args[0] if seen.args else None
        seen = inner if isinstance(inner, BaseException) else seen.__cause__
    return False


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read within the limits: the status, the headers and at most
    ``max_response_bytes`` of the body (``complete`` is False when there was more)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    complete: bool
    limit: int
    encoding: Optional[str] = None


def error_from_answer(answer: Answer, what: str) -> Exception:
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


def _error_message(answer: Answer) -> tuple[str, str]:
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


__all__ = [
    "Answer",
    "DeliveryFailed",
    "FatalApiError",
    "NotSent",
    "OutcomeUnknown",
    "RateLimited",
    "RequestFailed",
    "classify_exception",
    "describe",
    "error_from_answer",
    "parse_retry_after",
]
