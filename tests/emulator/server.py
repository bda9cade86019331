"""An Allocations API emulator (stdlib only) with fault injection, for tests.

It serves the subset of the contract slurm-tracker uses, for one organization:

- ``POST/GET/DELETE /api/organizations/{org}/allocations/{name}/usage``,
  ``DELETE .../allocations/{name}/usage/all``
- ``GET /api/organizations/{org}/allocations/{name}``
- ``GET /api/organizations/{org}/units``, ``.../units/{unit}/skus[?includeArchived=true]``,
  ``.../units/{unit}/skus/{sku}/rules`` (``{sku}``: the SKU id, or its code)

Requests need HTTP Basic auth with the configured key as user name (401 otherwise). Bodies are
checked against :mod:`tests.emulator.schemas`; errors use the contract's ``Error`` body, or
``Problem`` when the request accepts ``application/problem+json``.

Rating, like the platform: ``amount = quantity x SKU rate x unit USD rate`` (the last factor
only when the unit is ``ratedInUsd``), each rate from the rule in force at ``startedAt``
(``[effectiveFrom, effectiveTo)``); a SKU without rules has rate 1. An event whose
``startedAt`` falls where rules exist but none covers it is refused (400 ``no_rate``): the
platform's behaviour there is unknown, and a refusal makes a mismatch visible in tests.
An unknown or archived SKU code is refused with 404 ``not_found`` (the contract does not say).

The list (``GET .../usage``) takes every filter of the contract, each bound inclusive (see
:mod:`tests.emulator.filters`): ``startedAtFrom/To``, ``endedAtFrom/To``, ``createdAtFrom/To``
(RFC 3339, compared as instants), ``quantityMin/Max``, ``amountMin/Max``, ``unitRateMin/Max``
(numbers), ``type`` and ``subtype`` (case-insensitive "contains"), ``metadata``
(case-insensitive "contains" in the metadata's JSON text); a value that cannot be read is a 400.
``page`` is 1-indexed (default 1), ``pageSize`` defaults to 50 and is capped at
``max_page_size`` (the answer's ``pageSize`` says what was used); ``total`` and ``totalPages``
count the filtered events; a page past the end is empty. Items are ordered by ``createdAt``,
then by arrival. ``DELETE .../usage`` with ``{"ids": [...]}`` deletes the events of that
allocation with those list-item ids and answers ``{"deleted": n}`` (ids that existed);
``DELETE .../usage/all`` deletes the allocation's events that the same filters select (all of
them without filters) and answers the same way.

``latency_s`` (``--latency`` of ``python -m tests.emulator``) delays every API answer by that
many seconds after the request was processed, like a distant server (admin requests are not
delayed); it adds to a ``slow`` fault's delay. Benchmarks use it.

``createdAt`` is the time of the POST on the emulator's wall clock: ``wall_clock`` (default:
the real time), or a time pinned with :meth:`Emulator.set_now` or ``POST /_emulator/clock``.

Admin endpoint (no auth), for tests that run the emulator in another process
(:class:`AdminClient` wraps it):

- ``GET /_emulator/health`` -> ``{"ok": true}``
- ``GET /_emulator/events`` -> ``{"events": [StoredEvent.to_json(), ...]}``
- ``GET /_emulator/requests`` -> ``{"requests": [{method, path, query, body, authUser,
  status, fault}, ...]}`` (every API request, admin ones excluded)
- ``GET /_emulator/faults`` -> ``{"faults": [...], "outageRemaining": seconds or null}``
- ``POST /_emulator/faults`` with a fault object or ``{"faults": [...]}`` (see :class:`Fault`)
- ``DELETE /_emulator/faults``: drop every fault and end an outage
- ``POST /_emulator/outage`` with ``{"seconds": 5}``: every API connection is closed without
  an answer (reset) until then
- ``POST /_emulator/reset`` (optional body ``{"catalog": {...}}``): forget events, requests,
  faults, outage and a pinned clock
- ``GET /_emulator/catalog`` -> the catalog
- ``GET /_emulator/clock`` -> ``{"now": RFC 3339, "pinned": bool}``; ``POST /_emulator/clock``
  with ``{"now": "2026-03-01T00:00:00Z"}`` pins the wall clock (``createdAt`` of new events),
  ``{"now": null}`` unpins it
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional, Union
from urllib import request as urlrequest
from urllib.parse import parse_qs, unquote, urlsplit

from tests.emulator import schemas
from tests.emulator.filters import InvalidQuery, UsageFilter, instant

DEFAULT_ORGANIZATION = "test-org"
#: ``pwt_<base64url("localhost")>.<secret>``
DEFAULT_API_KEY = "pwt_bG9jYWxob3N0.emulator-secret-0123456789"
DEFAULT_MAX_PAGE_SIZE = 100
ADMIN_PREFIX = "/_emulator"
REPO = Path(__file__).resolve().parents[2]

#: A small catalog like the slurm-box cluster's: a USD-rated unit and a raw one.
DEFAULT_CATALOG: Mapping[str, Any] = {
    "allocations": {
        "physics": {"unit": "credits", "total": 100000},
        "chemistry": {"unit": "credits", "total": 50000},
        "gpu-lab": {"unit": "gpu-hours", "total": 1000},
    },
    "units": {
        "credits": {
            "ratedInUsd": True,
            "rules": [
                {"effectiveFrom": "2020-01-01T00:00:00Z", "effectiveTo": None, "rate": "0.05"}
            ],
        },
        "gpu-hours": {"ratedInUsd": False, "rules": []},
    },
    "skus": {
        "credits": {
            "CPU_HOUR": {
                "name": "CPU core-hour",
                "type": "Compute",
                "subtype": "CoreHour",
                "rules": [
                    {
                        "effectiveFrom": "2020-01-01T00:00:00Z",
                        "effectiveTo": "2026-01-01T00:00:00Z",
                        "rate": "1",
                    },
                    {"effectiveFrom": "2026-01-01T00:00:00Z", "effectiveTo": None, "rate": "1.5"},
                ],
            },
            "GPU_HOUR": {
                "name": "GPU-hour",
                "type": "Compute",
                "subtype": "GpuHour",
                "rules": [
                    {"effectiveFrom": "2020-01-01T00:00:00Z", "effectiveTo": None, "rate": "20"}
                ],
            },
            "MEM_GB_HOUR": {"name": "Memory GB-hour", "type": "Compute", "subtype": "GbHour"},
            "OLD_SKU": {"name": "Retired", "type": "Compute", "subtype": "Old", "archived": True},
        },
        "gpu-hours": {
            "GPU_HOUR": {"name": "GPU-hour", "type": "Compute", "subtype": "GpuHour"},
        },
    },
}


def _real_now() -> datetime:
    return datetime.now(timezone.utc)


def _time_text(when: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as the platform writes ``createdAt``."""
    utc = when.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _id(kind: str, *names: str) -> str:
    """A stable id for a catalog object (the same across restarts)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "emulator:" + kind + ":" + "/".join(names)))


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a number: {value!r}")
    return Decimal(str(value))


def _number(value: Decimal) -> Union[int, float]:
    """A JSON number for a Decimal (exact for integers, the nearest float otherwise)."""
    return int(value) if value == value.to_integral_value() else float(value)


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return _number(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _dumps(value: object) -> bytes:
    return json.dumps(value, default=_json_default, ensure_ascii=False).encode("utf-8")


# --- the catalog ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    effective_from: datetime
    effective_to: Optional[datetime]
    rate: Decimal
    effective_from_text: str
    effective_to_text: Optional[str]

    def covers(self, at: datetime) -> bool:
        return self.effective_from <= at and (self.effective_to is None or at < self.effective_to)


def _rules(raw: object, where: str) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"catalog: {where}: rules must be a list")
    rules = []
    for i, item in enumerate(raw):
        try:
            start = str(item["effectiveFrom"])
            end = item.get("effectiveTo")
            rules.append(
                Rule(
                    schemas.parse_rfc3339(start),
                    None if end is None else schemas.parse_rfc3339(str(end)),
                    _decimal(item["rate"]),
                    start,
                    None if end is None else str(end),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"catalog: {where}: rule {i}: {exc}") from exc
    return tuple(sorted(rules, key=lambda r: r.effective_from))


def _rate_at(rules: tuple[Rule, ...], at: datetime) -> Optional[Decimal]:
    """The rule in force at ``at``; 1 when there are no rules; None in a gap."""
    if not rules:
        return Decimal(1)
    for rule in rules:
        if rule.covers(at):
            return rule.rate
    return None


@dataclass(frozen=True)
class Sku:
    code: str
    unit: str
    name: str
    type: str
    subtype: str
    description: str
    archived: bool
    rules: tuple[Rule, ...]

    @property
    def id(self) -> str:
        return _id("sku", self.unit, self.code)

    def current_rate(self) -> Decimal:
        """The open-ended rule's rate, else the most recent rule's, else 1 (the contract)."""
        for rule in self.rules:
            if rule.effective_to is None:
                return rule.rate
        return self.rules[-1].rate if self.rules else Decimal(1)


@dataclass(frozen=True)
class Unit:
    name: str
    rated_in_usd: bool
    rules: tuple[Rule, ...]

    @property
    def id(self) -> str:
        return _id("unit", self.name)


@dataclass(frozen=True)
class Catalog:
    allocations: Mapping[str, tuple[str, Decimal]]  # name -> (unit, total)
    units: Mapping[str, Unit]
    skus: Mapping[str, Mapping[str, Sku]]  # unit -> code -> Sku
    raw: Mapping[str, Any]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Catalog:
        """Read ``{"allocations": {name: unit | {unit, total}}, "units": {name: {ratedInUsd,
        rules}}, "skus": {unit: {code: {name?, type?, subtype?, description?, archived?,
        rules?}}}}``; rules are ``{effectiveFrom, effectiveTo (null: open), rate}``."""
        units = {
            name: Unit(name, bool(u.get("ratedInUsd", False)), _rules(u.get("rules"), name))
            for name, u in dict(raw.get("units", {})).items()
        }
        allocations: dict[str, tuple[str, Decimal]] = {}
        for name, spec in dict(raw.get("allocations", {})).items():
            unit, total = (
                (spec, Decimal(0))
                if isinstance(spec, str)
                else (
                    spec["unit"],
                    _decimal(spec.get("total", 0)),
                )
            )
            if unit not in units:
                raise ValueError(f"catalog: allocation {name!r}: unknown unit {unit!r}")
            allocations[name] = (unit, total)
        skus: dict[str, dict[str, Sku]] = {}
        for unit, by_code in dict(raw.get("skus", {})).items():
            if unit not in units:
                raise ValueError(f"catalog: skus of unknown unit {unit!r}")
            skus[unit] = {
                code: Sku(
                    code=code,
                    unit=unit,
                    name=str(s.get("name", code)),
                    type=str(s.get("type", "Compute")),
                    subtype=str(s.get("subtype", "")),
                    description=str(s.get("description", "")),
                    archived=bool(s.get("archived", False)),
                    rules=_rules(s.get("rules"), f"SKU {unit}/{code}"),
                )
                for code, s in dict(by_code).items()
            }
        return cls(allocations, units, skus, json.loads(json.dumps(raw, default=str)))


# --- events and faults ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEvent:
    """One accepted usage event and how the emulator rated it."""

    id: str  # the rated cost id: list items' ``id``, what DELETE takes
    usage_event_id: str  # what POST answered as ``id``
    allocation: str
    unit: str
    sku: str
    quantity: Decimal
    started_at: str
    ended_at: str
    created_at: str
    user: Optional[str]
    metadata: Mapping[str, Any]
    sku_rate: Decimal
    unit_rate: Decimal  # 1 when the unit is not rated in USD
    rated_in_usd: bool
    amount: Decimal  # quantity x sku_rate (x unit_rate when rated in USD), exact
    type: str = ""
    subtype: str = ""

    @property
    def event_key(self) -> Optional[str]:
        key = self.metadata.get("eventKey")
        return key if isinstance(key, str) else None

    def to_json(self) -> dict[str, Any]:
        """JSON for the admin endpoint: Decimals as exact strings."""
        return {
            "id": self.id,
            "usageEventId": self.usage_event_id,
            "allocation": self.allocation,
            "unit": self.unit,
            "sku": self.sku,
            "quantity": str(self.quantity),
            "startedAt": self.started_at,
            "endedAt": self.ended_at,
            "createdAt": self.created_at,
            "user": self.user,
            "metadata": json.loads(_dumps(self.metadata)),
            "skuRate": str(self.sku_rate),
            "unitRate": str(self.unit_rate),
            "ratedInUsd": self.rated_in_usd,
            "amount": str(self.amount),
            "type": self.type,
            "subtype": self.subtype,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StoredEvent:
        return cls(
            id=raw["id"],
            usage_event_id=raw["usageEventId"],
            allocation=raw["allocation"],
            unit=raw["unit"],
            sku=raw["sku"],
            quantity=Decimal(raw["quantity"]),
            started_at=raw["startedAt"],
            ended_at=raw["endedAt"],
            created_at=raw["createdAt"],
            user=raw.get("user"),
            metadata=raw.get("metadata") or {},
            sku_rate=Decimal(raw["skuRate"]),
            unit_rate=Decimal(raw["unitRate"]),
            rated_in_usd=bool(raw["ratedInUsd"]),
            amount=Decimal(raw["amount"]),
            type=raw.get("type", ""),
            subtype=raw.get("subtype", ""),
        )


FAULT_KINDS = ("status", "reset", "slow")


@dataclass
class Fault:
    """One scripted failure, applied to the next ``times`` matching API requests.

    - ``status``: answer ``status`` (500, 502, 503, 429, 400, ...) with an ``Error`` body and
      ``Retry-After: retry_after`` if given; with ``commit`` the request is processed (the
      event stored) first.
    - ``reset``: close the connection (TCP RST) without answering; after processing with
      ``commit``.
    - ``slow``: wait ``delay_s`` and then answer normally; with ``commit`` (the default for
      this kind in :meth:`from_json`) the event is stored before the wait, else after it (a
      request that lands late, after the client gave up).

    A request matches when every given filter does: ``method``; ``path`` (a regular
    expression searched in the decoded path); ``event_key`` (the body's ``metadata.eventKey``,
    or the ``metadata`` query parameter of a list request). ``times=None``: every match.
    """

    kind: str
    status: int = 500
    commit: bool = False
    method: Optional[str] = None
    path: Optional[str] = None
    event_key: Optional[str] = None
    retry_after: Optional[str] = None
    delay_s: float = 0.0
    times: Optional[int] = 1
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: use one of {FAULT_KINDS}")

    def matches(self, method: str, path: str, body: object, query: Mapping[str, str]) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        if self.event_key is not None:
            meta = body.get("metadata") if isinstance(body, dict) else None
            key = meta.get("eventKey") if isinstance(meta, dict) else None
            if key != self.event_key and query.get("metadata") != self.event_key:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "status": self.status,
            "commit": self.commit,
            "method": self.method,
            "path": self.path,
            "eventKey": self.event_key,
            "retryAfter": self.retry_after,
            "delay": self.delay_s,
            "times": self.times,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Fault:
        known = {
            "kind",
            "status",
            "commit",
            "method",
            "path",
            "eventKey",
            "retryAfter",
            "delay",
            "times",
            "message",
        }
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fault field(s) {sorted(unknown)}: use {sorted(known)}")
        kind = str(raw.get("kind", ""))
        retry_after = raw.get("retryAfter")
        return cls(
            kind=kind,
            status=int(raw.get("status", 500)),
            commit=bool(raw.get("commit", kind == "slow")),
            method=raw.get("method"),
            path=raw.get("path"),
            event_key=raw.get("eventKey"),
            retry_after=None if retry_after is None else str(retry_after),
            delay_s=float(raw.get("delay", 0.0)),
            times=raw.get("times", 1),
            message=str(raw.get("message", "")),
        )


class HttpError(Exception):
    """An error answer: the contract's Error body (or Problem when asked for)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: tuple[str, ...] = (),
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems
        self.headers = dict(headers or {})

    def error_body(self) -> dict[str, Any]:
        return {
            "error": True,
            "message": self.message,
            "code": self.code,
            "errors": list(self.problems) or None,
        }

    def problem_body(self) -> dict[str, Any]:
        field_errors = []
        for line in self.problems:
            pointer, _, detail = line.partition(": ")
            field_errors.append(
                {
                    "type": "/problems/invalid-field",
                    "code": "invalid",
                    "pointer": pointer,
                    "detail": detail,
                }
            )
        return {
            "type": f"/problems/{self.code}",
            "title": self.code.replace("_", " "),
            "status": self.status,
            "detail": self.message,
            "code": self.code,
            "errors": field_errors or None,
        }


@dataclass
class _Outcome:
    """What the dispatcher decided: a JSON answer, or no answer at all (reset)."""

    status: int = 200
    body: Any = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False
    delay_s: float = 0.0
    late_commit: Optional[Any] = None  # a callable run after the delay (slow, commit=False)


# --- the emulator -----------------------------------------------------------------------------


class Emulator:
    """The emulated API and its state; ``start()`` serves it on 127.0.0.1 in a thread."""

    def __init__(
        self,
        catalog: Optional[Mapping[str, Any]] = None,
        *,
        organization: str = DEFAULT_ORGANIZATION,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        state_file: Optional[Path] = None,
        max_page_size: int = DEFAULT_MAX_PAGE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _real_now,
        latency_s: float = 0.0,
    ) -> None:
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            raise ValueError(f"latency_s must be a finite number >= 0, got {latency_s!r}")
        self.catalog = Catalog.from_dict(catalog if catalog is not None else DEFAULT_CATALOG)
        self.latency_s = float(latency_s)  # added to every API answer
        self.organization = organization
        self.api_key = api_key
        self.host = host
        self.port = port
        self.state_file = state_file
        self.max_page_size = max_page_size
        self.clock = clock  # outage deadlines are read on it
        self.wall_clock = wall_clock  # createdAt of new events, unless pinned (set_now)
        self._pinned_now: Optional[datetime] = None
        self._lock = threading.RLock()
        self._events: list[StoredEvent] = []
        self._requests: list[dict[str, Any]] = []
        self._faults: list[Fault] = []
        self._outage_until: Optional[float] = None
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        if state_file is not None and state_file.exists():
            saved = json.loads(state_file.read_text(encoding="utf-8"))
            self._events = [StoredEvent.from_json(e) for e in saved.get("events", [])]

    # -- lifecycle

    def start(self) -> str:
        """Serve in a background thread; returns the base URL (``http://127.0.0.1:PORT``)."""
        if self._server is not None:
            return self.base_url
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.emulator = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving (slow answers in progress are cut short)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- the in-process test API

    def events(self) -> list[StoredEvent]:
        with self._lock:
            return list(self._events)

    def requests(self) -> list[dict[str, Any]]:
        """Every API request so far: method, path, query, body, authUser, status, fault."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def add_fault(self, fault: Union[Fault, Mapping[str, Any]]) -> None:
        with self._lock:
            self._faults.append(fault if isinstance(fault, Fault) else Fault.from_json(fault))

    def faults(self) -> list[Fault]:
        with self._lock:
            return [replace(f) for f in self._faults]

    def clear_faults(self) -> None:
        """Drop every pending fault and end an outage."""
        with self._lock:
            self._faults.clear()
            self._outage_until = None

    def outage(self, seconds: float) -> None:
        """Close every API connection without an answer for ``seconds`` from now."""
        with self._lock:
            self._outage_until = self.clock() + seconds

    def reset(self, catalog: Optional[Mapping[str, Any]] = None) -> None:
        """Forget events, requests, faults, outage and a pinned clock; optionally load another
        catalog."""
        with self._lock:
            if catalog is not None:
                self.catalog = Catalog.from_dict(catalog)
            self._events.clear()
            self._requests.clear()
            self._faults.clear()
            self._outage_until = None
            self._pinned_now = None
            self._save()

    def now(self) -> datetime:
        """The wall-clock time new events are created at (pinned, or ``wall_clock()``)."""
        with self._lock:
            pinned = self._pinned_now
        return pinned if pinned is not None else self.wall_clock()

    def set_now(self, when: Optional[datetime]) -> None:
        """Pin the wall clock at ``when`` (an aware datetime) for new events' ``createdAt``;
        None: back to ``wall_clock``."""
        if when is not None and when.utcoffset() is None:
            raise ValueError(f"set_now needs an aware datetime, got {when.isoformat()}")
        with self._lock:
            self._pinned_now = when

    # -- internals used by the handler

    def _in_outage(self) -> bool:
        with self._lock:
            if self._outage_until is None:
                return False
            if self.clock() < self._outage_until:
                return True
            self._outage_until = None
            return False

    def _take_fault(
        self, method: str, path: str, body: object, query: Mapping[str, str]
    ) -> Optional[Fault]:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(method, path, body, query):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            del self._faults[i]
                    return replace(fault)
        return None

    def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._requests.append(entry)
        return entry

    def _save(self) -> None:
        if self.state_file is None:
            return
        data = _dumps({"events": [e.to_json() for e in self._events]})
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.state_file)

    def _admin(self, method: str, path: str, body: object) -> _Outcome:
        route = path[len(ADMIN_PREFIX) :]
        if method == "GET" and route == "/health":
            return _Outcome(body={"ok": True})
        if method == "GET" and route == "/events":
            return _Outcome(body={"events": [e.to_json() for e in self.events()]})
        if method == "GET" and route == "/requests":
            return _Outcome(body={"requests": self.requests()})
        if method == "GET" and route == "/catalog":
            return _Outcome(body=self.catalog.raw)
        if route == "/clock" and method in ("GET", "POST"):
            if method == "POST":
                if not isinstance(body, dict) or "now" not in body:
                    raise HttpError(400, "invalid", 'POST {"now": "<RFC 3339>" or null}')
                text = body["now"]
                try:
                    self.set_now(None if text is None else schemas.parse_rfc3339(str(text)))
                except ValueError as exc:
                    raise HttpError(400, "invalid", f"bad time: {exc}") from exc
            with self._lock:
                pinned = self._pinned_now is not None
            return _Outcome(body={"now": _time_text(self.now()), "pinned": pinned})
        if route == "/faults":
            if method == "GET":
                with self._lock:
                    left = (
                        None
                        if self._outage_until is None
                        else max(0.0, self._outage_until - self.clock())
                    )
                return _Outcome(
                    body={"faults": [f.to_json() for f in self.faults()], "outageRemaining": left}
                )
            if method == "POST":
                raw = body.get("faults", [body]) if isinstance(body, dict) else body
                if not isinstance(raw, list):
                    raise HttpError(400, "invalid", "POST a fault object or {faults: [...]}")
                try:
                    faults = [Fault.from_json(f) for f in raw]
                except (TypeError, ValueError, AttributeError) as exc:
                    raise HttpError(400, "invalid", f"bad fault: {exc}") from exc
                for fault in faults:
                    self.add_fault(fault)
                return _Outcome(body={"queued": len(faults)})
            if method == "DELETE":
                self.clear_faults()
                return _Outcome(body={"cleared": True})
        if method == "POST" and route == "/outage":
            seconds = body.get("seconds") if isinstance(body, dict) else None
            if not isinstance(seconds, (int, float, Decimal)) or isinstance(seconds, bool):
                raise HttpError(400, "invalid", 'POST {"seconds": <number>}')
            self.outage(float(seconds))
            return _Outcome(body={"outage": float(seconds)})
        if method == "POST" and route == "/reset":
            catalog = body.get("catalog") if isinstance(body, dict) else None
            try:
                self.reset(catalog)
            except (KeyError, TypeError, ValueError) as exc:
                raise HttpError(400, "invalid", f"bad catalog: {exc}") from exc
            return _Outcome(body={"reset": True})
        raise HttpError(404, "not_found", f"no admin route {method} {path}")

    def _api(
        self, method: str, segments: list[str], query: Mapping[str, str], body: object
    ) -> tuple[int, Any]:
        """Route an authenticated API request; returns (status, JSON body)."""
        if len(segments) < 3 or segments[:2] != ["api", "organizations"]:
            raise HttpError(404, "not_found", "no such route")
        if segments[2] != self.organization:
            raise HttpError(404, "not_found", f"organization {segments[2]!r} not found")
        rest = segments[3:]
        if len(rest) == 2 and rest[0] == "allocations":
            self._only(method, "GET")
            return 200, self._get_allocation(rest[1])
        if len(rest) == 3 and rest[0] == "allocations" and rest[2] == "usage":
            if method == "POST":
                return 200, self._post_usage(rest[1], body)
            if method == "GET":
                return 200, self._list_usage(rest[1], query)
            if method == "DELETE":
                return 200, self._delete_usage(rest[1], body)
            self._only(method, "GET, POST, DELETE")
        if len(rest) == 4 and rest[0] == "allocations" and rest[2:] == ["usage", "all"]:
            self._only(method, "DELETE")
            return 200, self._delete_all_usage(rest[1], query)
        if rest == ["units"]:
            self._only(method, "GET")
            return 200, [self._unit_json(u) for u in self.catalog.units.values()]
        if len(rest) == 3 and rest[0] == "units" and rest[2] == "skus":
            self._only(method, "GET")
            archived = query.get("includeArchived", "false").lower() in ("true", "1")
            skus = self._skus_of(rest[1]).values()
            return 200, [self._sku_json(s) for s in skus if archived or not s.archived]
        if len(rest) == 5 and rest[0] == "units" and rest[2] == "skus" and rest[4] == "rules":
            self._only(method, "GET")
            sku = self._find_sku(rest[1], rest[3])
            return 200, [
                self._rule_json(r, "customSkuId", sku.id, f"{sku.unit}/{sku.code}", i)
                for i, r in enumerate(sku.rules)
            ]
        raise HttpError(404, "not_found", "no such route")

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method not in allowed.split(", "):
            raise HttpError(
                405,
                "method_not_allowed",
                f"{method} is not allowed here",
                headers={"Allow": allowed},
            )

    def _allocation(self, name: str) -> tuple[str, Decimal]:
        found = self.catalog.allocations.get(name)
        if found is None:
            raise HttpError(404, "not_found", f"allocation {name!r} not found")
        return found

    def _get_allocation(self, name: str) -> dict[str, Any]:
        unit_name, total = self._allocation(name)
        unit = self.catalog.units[unit_name]
        used = sum((e.amount for e in self.events() if e.allocation == name), Decimal(0))
        return {
            "name": name,
            "unit": unit_name,
            "total": total,
            "type": "managed" if unit.rated_in_usd else "custom",
            "ratedInUsd": unit.rated_in_usd,
            "used": used,
            "estimatedUsed": used,
            "usable": total > 0,
            "hasCloudUsage": False,
            "resourceGroups": 0,
            "allowed": [],
        }

    def _skus_of(self, unit: str) -> Mapping[str, Sku]:
        if unit not in self.catalog.units:
            raise HttpError(404, "not_found", f"unit {unit!r} not found")
        return self.catalog.skus.get(unit, {})

    def _find_sku(self, unit: str, sku: str) -> Sku:
        skus = self._skus_of(unit)
        for candidate in skus.values():
            if sku in (candidate.id, candidate.code):
                return candidate
        raise HttpError(404, "not_found", f"SKU {sku!r} not found in unit {unit!r}")

    def _org_id(self) -> str:
        return _id("org", self.organization)

    def _rule_json(
        self, rule: Rule, parent_key: str, parent_id: str, owner: str, index: int
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": _id("rule", owner, str(index)),
            parent_key: parent_id,
            "effectiveFrom": rule.effective_from_text,
            "rate": rule.rate,
        }
        if rule.effective_to_text is not None:  # the contract types it as a string: omit null
            out["effectiveTo"] = rule.effective_to_text
        return out

    def _unit_json(self, unit: Unit) -> dict[str, Any]:
        return {
            "id": unit.id,
            "organizationId": self._org_id(),
            "name": unit.name,
            "ratedInUsd": unit.rated_in_usd,
            "Rules": [
                self._rule_json(r, "unitId", unit.id, unit.name, i)
                for i, r in enumerate(unit.rules)
            ],
            "createdAt": "2020-01-01T00:00:00Z",
        }

    def _sku_json(self, sku: Sku) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": sku.id,
            "organizationId": self._org_id(),
            "code": sku.code,
            "name": sku.name,
            "unitId": _id("unit", sku.unit),
            "type": sku.type,
            "subtype": sku.subtype,
            "currentRate": sku.current_rate(),
        }
        if sku.description:
            out["description"] = sku.description
        if sku.archived:
            out["deletedAt"] = "2024-01-01T00:00:00Z"
        return out

    def _post_usage(self, allocation: str, body: object) -> dict[str, Any]:
        problems = schemas.validate(body, schemas.POST_USAGE_EVENT_INPUT)
        if problems:
            raise HttpError(400, "invalid", "the usage event is invalid", tuple(problems))
        assert isinstance(body, dict)
        unit_name, _ = self._allocation(allocation)
        unit = self.catalog.units[unit_name]
        sku = self.catalog.skus.get(unit_name, {}).get(body["sku"])
        if sku is None or sku.archived:
            raise HttpError(
                404,
                "not_found",
                f"SKU {body['sku']!r} not found in unit {unit_name!r} of allocation {allocation!r}",
            )
        started = schemas.parse_rfc3339(body["startedAt"])
        sku_rate = _rate_at(sku.rules, started)
        unit_rate = _rate_at(unit.rules, started) if unit.rated_in_usd else Decimal(1)
        if sku_rate is None or unit_rate is None:
            what = f"SKU {sku.code!r}" if sku_rate is None else f"unit {unit.name!r}"
            raise HttpError(
                400, "no_rate", f"no rate rule of {what} covers startedAt {body['startedAt']}"
            )
        quantity = _decimal(body["quantity"])
        event = StoredEvent(
            id=str(uuid.uuid4()),
            usage_event_id=str(uuid.uuid4()),
            allocation=allocation,
            unit=unit_name,
            sku=sku.code,
            quantity=quantity,
            started_at=body["startedAt"],
            ended_at=body["endedAt"],
            created_at=_time_text(self.now()),
            user=body.get("user"),
            metadata=dict(body.get("metadata") or {}),
            sku_rate=sku_rate,
            unit_rate=unit_rate,
            rated_in_usd=unit.rated_in_usd,
            amount=quantity * sku_rate * unit_rate,
            type=sku.type,
            subtype=sku.subtype,
        )
        with self._lock:
            self._events.append(event)
            self._save()
        return {
            "id": event.usage_event_id,
            "organization": self.organization,
            "allocation": allocation,
            "quantity": quantity,
            "startedAt": event.started_at,
            "endedAt": event.ended_at,
            "createdAt": event.created_at,
        }

    def _list_usage(self, allocation: str, query: Mapping[str, str]) -> dict[str, Any]:
        self._allocation(allocation)
        page = _positive_int(query, "page", 1)
        size = min(_positive_int(query, "pageSize", 50), self.max_page_size)
        matching = self._matching(allocation, _filter(query))
        chunk = matching[(page - 1) * size : page * size]
        return {
            "items": [self._rated_cost_json(e) for e in chunk],
            "total": len(matching),
            "page": page,
            "pageSize": size,
            "totalPages": math.ceil(len(matching) / size),
        }

    def _matching(self, allocation: str, selected: UsageFilter) -> list[StoredEvent]:
        """The allocation's events that ``selected`` keeps, by ``createdAt`` then arrival."""
        events = [e for e in self.events() if e.allocation == allocation and selected.matches(e)]
        return sorted(events, key=lambda e: instant(e.created_at))  # stable: ties by arrival

    def _rated_cost_json(self, event: StoredEvent) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": event.id,
            "usageEventId": event.usage_event_id,
            "organizationId": self._org_id(),
            "allocationId": _id("allocation", event.allocation),
            "unitId": _id("unit", event.unit),
            "quantity": event.quantity,
            "amount": event.amount,
            "startedAt": event.started_at,
            "endedAt": event.ended_at,
            "createdAt": event.created_at,
            "type": event.type,
            "subtype": event.subtype,
            "unitAppliedRate": event.unit_rate,
            "skuAppliedRate": event.sku_rate,
            "metadata": event.metadata,
            "createdByUsername": "api-key",
        }
        if event.user:
            out["attributedToUsername"] = event.user
        return out

    def _delete_usage(self, allocation: str, body: object) -> dict[str, Any]:
        problems = schemas.validate(body, schemas.DELETE_USAGE_INPUT)
        if problems:
            raise HttpError(400, "invalid", "the delete request is invalid", tuple(problems))
        assert isinstance(body, dict)
        self._allocation(allocation)
        ids = set(body.get("ids") or [])
        with self._lock:
            before = len(self._events)
            self._events = [
                e for e in self._events if not (e.allocation == allocation and e.id in ids)
            ]
            deleted = before - len(self._events)
            self._save()
        return {"deleted": deleted}

    def _delete_all_usage(self, allocation: str, query: Mapping[str, str]) -> dict[str, Any]:
        self._allocation(allocation)
        selected = _filter(query)
        with self._lock:
            doomed = {e.id for e in self._matching(allocation, selected)}
            self._events = [
                e for e in self._events if not (e.allocation == allocation and e.id in doomed)
            ]
            self._save()
        return {"deleted": len(doomed)}


def _filter(query: Mapping[str, str]) -> UsageFilter:
    try:
        return UsageFilter.from_query(query)
    except InvalidQuery as exc:
        raise HttpError(
            400, "invalid", "query parameters of the usage list are invalid", exc.problems
        ) from exc


def _positive_int(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise HttpError(
            400,
            "invalid",
            f"query parameter {name} must be a positive integer",
            (f"{name}: expected a positive integer, got {text!r}",),
        )
    return int(text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    emulator: Emulator


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as a real API behind a proxy
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms stalls
    error_content_type = "application/json"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :meth:`Emulator.requests` instead."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # --

    def _handle(self, method: str) -> None:
        emulator = self.server.emulator
        parts = urlsplit(self.path)
        raw_path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        body: object = None
        body_error = ""
        if raw_body:
            try:
                body = json.loads(raw_body.decode("utf-8"), parse_float=Decimal)
            except (UnicodeDecodeError, ValueError) as exc:
                body_error = f"the body is not JSON: {exc}"
                body = raw_body.decode("utf-8", errors="replace")
        problem_json = "application/problem+json" in (self.headers.get("Accept") or "")

        if raw_path.startswith(ADMIN_PREFIX + "/") or raw_path == ADMIN_PREFIX:
            try:
                if body_error:
                    raise HttpError(400, "invalid", body_error)
                outcome = emulator._admin(method, unquote(raw_path), body)
            except HttpError as exc:
                outcome = _error_outcome(exc, problem_json)
            self._answer(outcome)
            return

        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        entry = emulator._record(
            {
                "method": method,
                "path": "/" + "/".join(segments),
                "rawPath": raw_path,
                "query": query,
                "body": json.loads(_dumps(body)) if body is not None else None,
                "authUser": self._auth_user(),
                "status": None,
                "fault": None,
            }
        )
        if emulator._in_outage():
            entry["status"] = "outage"
            self._reset()
            return
        if entry["authUser"] != emulator.api_key:
            entry["status"] = 401
            self._answer(
                _error_outcome(
                    HttpError(
                        401,
                        "unauthorized",
                        "authentication required: HTTP Basic with an API key",
                        headers={"WWW-Authenticate": 'Basic realm="api"'},
                    ),
                    problem_json,
                )
            )
            return
        fault = emulator._take_fault(method, entry["path"], body, query)
        entry["fault"] = fault.to_json() if fault is not None else None

        def process() -> _Outcome:
            try:
                if body_error:
                    raise HttpError(400, "invalid", body_error)
                status, payload = emulator._api(method, segments, query, body)
                return _Outcome(status=status, body=payload)
            except HttpError as exc:
                return _error_outcome(exc, problem_json)

        if fault is None:
            outcome = process()
        elif fault.kind == "reset":
            if fault.commit:
                process()
            outcome = _Outcome(reset=True)
        elif fault.kind == "slow":
            if fault.commit:
                outcome = process()
                outcome.delay_s = fault.delay_s
            else:
                emulator._stopping.wait(fault.delay_s)
                outcome = process()
        else:
            if fault.commit:
                process()
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            outcome = _error_outcome(
                HttpError(
                    fault.status,
                    _code_for(fault.status),
                    fault.message or f"injected fault: HTTP {fault.status}",
                    headers=headers,
                ),
                problem_json,
            )
        if outcome.reset:
            entry["status"] = "reset"
            self._reset()
            return
        delay_s = outcome.delay_s + emulator.latency_s
        if delay_s:
            emulator._stopping.wait(delay_s)
        entry["status"] = outcome.status
        self._answer(outcome)

    def _auth_user(self) -> Optional[str]:
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, _ = decoded.partition(":")
        return user

    def _answer(self, outcome: _Outcome) -> None:
        data = _dumps(outcome.body) if outcome.body is not None else b""
        try:
            self.send_response(outcome.status)
            if data:
                self.send_header("Content-Type", outcome.content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in outcome.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (e.g. after its read timeout)

    def _reset(self) -> None:
        """Close the connection with a TCP RST, without answering."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def _code_for(status: int) -> str:
    return {
        400: "invalid",
        404: "not_found",
        408: "request_timeout",
        429: "rate_limited",
        500: "internal",
        502: "bad_gateway",
        503: "unavailable",
        504: "gateway_timeout",
    }.get(status, f"http_{status}")


def _error_outcome(exc: HttpError, problem_json: bool) -> _Outcome:
    if problem_json:
        return _Outcome(
            status=exc.status,
            body=exc.problem_body(),
            content_type="application/problem+json",
            headers=exc.headers,
        )
    return _Outcome(status=exc.status, body=exc.error_body(), headers=exc.headers)


# --- running it in another process ----------------------------------------------------------


class AdminClient:
    """The admin endpoint of an emulator running anywhere (stdlib HTTP)."""

    def __init__(self, base_url: str, timeout_s: float = 10) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, route: str, body: object = None) -> Any:
        data = _dumps(body) if body is not None else None
        req = urlrequest.Request(
            self.base_url + ADMIN_PREFIX + route,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        with urlrequest.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def health(self) -> bool:
        return bool(self._call("GET", "/health").get("ok"))

    def events(self) -> list[StoredEvent]:
        return [StoredEvent.from_json(e) for e in self._call("GET", "/events")["events"]]

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/requests")["requests"])

    def add_fault(self, fault: Union[Fault, Mapping[str, Any]]) -> None:
        raw = fault.to_json() if isinstance(fault, Fault) else dict(fault)
        self._call("POST", "/faults", {"faults": [raw]})

    def faults(self) -> dict[str, Any]:
        return dict(self._call("GET", "/faults"))

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    def outage(self, seconds: float) -> None:
        self._call("POST", "/outage", {"seconds": seconds})

    def reset(self, catalog: Optional[Mapping[str, Any]] = None) -> None:
        self._call("POST", "/reset", {"catalog": catalog} if catalog is not None else {})

    def now(self) -> datetime:
        """The emulator's wall clock (what ``createdAt`` of a new event would be)."""
        return schemas.parse_rfc3339(self._call("GET", "/clock")["now"])

    def set_now(self, when: Optional[datetime]) -> None:
        """Pin the emulator's wall clock at ``when`` (aware); None: the real time again."""
        if when is not None and when.utcoffset() is None:
            raise ValueError(f"set_now needs an aware datetime, got {when.isoformat()}")
        self._call("POST", "/clock", {"now": None if when is None else when.isoformat()})


class EmulatorProcess:
    """``python -m tests.emulator`` in a child process; ``start()`` returns its base URL."""

    def __init__(
        self,
        catalog: Optional[Mapping[str, Any]] = None,
        *,
        organization: str = DEFAULT_ORGANIZATION,
        api_key: str = DEFAULT_API_KEY,
        state_file: Optional[Path] = None,
        max_page_size: int = DEFAULT_MAX_PAGE_SIZE,
        start_timeout_s: float = 20,
        latency_s: float = 0.0,
    ) -> None:
        self.catalog = catalog
        self.latency_s = latency_s
        self.organization = organization
        self.api_key = api_key
        self.state_file = state_file
        self.max_page_size = max_page_size
        self.start_timeout_s = start_timeout_s
        self.process: Optional[subprocess.Popen[str]] = None
        self.base_url = ""
        self._catalog_dir: Optional[tempfile.TemporaryDirectory[str]] = None

    def start(self) -> str:
        args = [
            sys.executable,
            "-m",
            "tests.emulator",
            "--port",
            "0",
            "--organization",
            self.organization,
            "--max-page-size",
            str(self.max_page_size),
            "--latency",
            repr(float(self.latency_s)),
        ]
        if self.state_file is not None:
            args += ["--state-file", str(self.state_file)]
        if self.catalog is not None:
            self._catalog_dir = tempfile.TemporaryDirectory()
            path = Path(self._catalog_dir.name) / "catalog.json"
            path.write_bytes(_dumps(self.catalog))
            args += ["--catalog", str(path)]
        env = dict(os.environ, EMULATOR_API_KEY=self.api_key)
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = _readline_with_timeout(self.process, self.start_timeout_s)
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"the emulator did not start: first line {line!r}")
        self.base_url = line.strip()
        return self.base_url

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.base_url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self._catalog_dir is not None:
            self._catalog_dir.cleanup()
            self._catalog_dir = None

    def __enter__(self) -> EmulatorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()


def _readline_with_timeout(process: subprocess.Popen[str], timeout_s: float) -> str:
    result: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else ""
