"""The one in-process fake Allocations API of the unit tests (served through `responses`).

It accepts usage events and lists them by a ``metadata`` substring, page by page, as the
platform does, and misbehaves on request:

- ``mode`` (lasting): ``ok``; ``down`` (connection refused); ``poison`` (502 for job 1000);
  ``reject-gpu`` (400 for GPU_HOUR SKUs);
- ``faults`` (one per POST, in order): ``refused``, ``429``, ``400``, ``503``, and after
  accepting the event: ``commit+503``, ``commit+timeout``, ``commit+reset``;
- ``on_post(body)`` runs inside each POST before it is accepted (it may raise a transport
  error: not accepted); ``after_post(n)`` after each accepted one;
- ``lookup_status``: the status of every list request (401 to refuse look-ups).

The contract-checked emulator (tests/emulator) serves the end-to-end and CLI-with-server
tests; this fake is for tests that need to script faults at exact points.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable, Optional

import requests
import responses
import urllib3

BASE = "https://api.test"
USAGE = re.compile(re.escape(BASE) + r"/api/organizations/[^/]+/allocations/([^/]+)/usage")

Answer = tuple[int, dict[str, str], str]


class FakeApi:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []  # accepted bodies, in order (event i: evt-i)
        self.posts = 0
        self.lookups = 0
        self.mode = "ok"
        self.faults: list[str] = []
        self.on_post: Optional[Callable[[dict[str, Any]], None]] = None
        self.after_post: Optional[Callable[[int], None]] = None
        self.lookup_status = 200

    # -- the two endpoints

    def post(self, request: Any) -> Answer:
        body = json.loads(request.body)
        self.posts += 1
        fault = self.faults.pop(0) if self.faults else "ok"
        if self.mode == "down" or fault == "refused":
            raise requests.exceptions.ConnectionError(
                urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
            )
        if self.mode == "poison" and body["metadata"]["jobId"] == "1000":
            return 502, {}, "bad gateway"
        if self.mode == "reject-gpu" and body["sku"].endswith("GPU_HOUR"):
            return 400, {}, json.dumps({"error": True, "message": "SKU archived", "code": "x"})
        if fault == "429":
            return 429, {"Retry-After": "0"}, json.dumps({"error": True, "message": "slow down"})
        if fault == "400":
            return 400, {}, json.dumps({"error": True, "message": "unknown sku", "code": "bad"})
        if fault == "503":
            return 503, {}, "busy"
        if self.on_post is not None:
            self.on_post(body)  # may raise: not accepted
        self.events.append(body)
        created = {"id": f"evt-{len(self.events)}", **body}
        if self.after_post is not None:
            self.after_post(len(self.events))
        if fault == "commit+503":
            return 503, {}, "proxy error"
        if fault == "commit+timeout":
            raise requests.exceptions.ReadTimeout("read timed out")
        if fault == "commit+reset":
            raise requests.exceptions.ConnectionError(ConnectionResetError(104, "reset"))
        return 200, {}, json.dumps(created)

    def list_usage(self, request: Any) -> Answer:
        self.lookups += 1
        if self.lookup_status != 200:
            message = {"error": True, "message": "invalid API key", "code": "unauthorized"}
            return self.lookup_status, {}, json.dumps(message)
        query = request.params
        needle = str(query.get("metadata", "")).lower()
        items = [
            {"id": f"rc-{i}", "usageEventId": f"evt-{i}", **e}
            for i, e in enumerate(self.events, 1)
            if needle in json.dumps(e["metadata"]).lower()
        ]
        size = int(query.get("pageSize", 100))
        page = int(query.get("page", 1))
        pages = max(1, -(-len(items) // size))
        return (
            200,
            {},
            json.dumps(
                {
                    "items": items[(page - 1) * size : page * size],
                    "total": len(items),
                    "page": page,
                    "pageSize": size,
                    "totalPages": pages,
                }
            ),
        )

    # -- what was accepted

    def keys(self) -> list[str]:
        return [e["metadata"]["eventKey"] for e in self.events]

    def jobs(self) -> list[str]:
        return sorted(e["metadata"]["jobId"] for e in self.events)

    def quantity(self) -> float:
        return float(sum(e["quantity"] for e in self.events))

    def assert_exactly_once(self) -> None:
        twice = [k for k, n in Counter(self.keys()).items() if n > 1]
        assert not twice, f"accepted twice: {twice}"
        assert self.posts == len(self.events), "an event was POSTed again (no look-up)"

    def billed(self) -> dict[tuple[str, str], Decimal]:
        """Quantity accepted per (run text, metric)."""
        sums: dict[tuple[str, str], Decimal] = {}
        for event in self.events:
            meta = event["metadata"]
            submitted = datetime.fromisoformat(meta["submittedAt"].replace("Z", "+00:00"))
            run = f"{meta['cluster']}:{meta['jobIdRaw']}:{int(submitted.timestamp())}"
            key = (run, meta["metric"])
            sums[key] = sums.get(key, Decimal(0)) + Decimal(str(event["quantity"]))
        return sums


@contextmanager
def serving(fake: FakeApi) -> Iterator[FakeApi]:
    """``fake`` answering the usage endpoints of BASE (any organisation) while inside."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, USAGE, callback=fake.post)
        mock.add_callback(responses.GET, USAGE, callback=fake.list_usage)
        yield fake
