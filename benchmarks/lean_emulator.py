"""The API emulator (tests/emulator) behind a lean HTTP front end, for the delivery benchmark.

    python benchmarks/lean_emulator.py [--latency SECONDS]

prints its base URL (``http://127.0.0.1:PORT``) on the first line, then serves until SIGTERM.

The API is the emulator's own: the same routes, authentication (HTTP Basic, the key of
``$EMULATOR_API_KEY`` or ``DEFAULT_API_KEY``), validation of every body against the
contract's schemas, rating and storage (:meth:`Emulator._api`), and its admin endpoint
(:meth:`Emulator._admin`: events, reset, ...). Only the HTTP layer differs: one asyncio loop
instead of a thread per connection and ``http.server``'s parsing, and each answer in one
write. The emulator's own server took about 170 us of CPU per request, three times its API
logic, on the same two cores as the client it is meant to measure: the figures were the
emulator's as much as the client's. What this front end leaves out: fault injection and
outages, and the request log (``/_emulator/requests`` stays empty); ``latency`` delays every
API answer (not admin ones) without holding a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import signal
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.emulator import server
from tests.emulator.server import DEFAULT_API_KEY, Emulator, HttpError

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}


class Front:
    """One emulator served over HTTP/1.1 keep-alive connections."""

    def __init__(self, emulator: Emulator, latency_s: float) -> None:
        self.emulator = emulator
        self.latency_s = latency_s

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                status, payload, extra = self.answer(method, target, headers, raw)
                if self.latency_s and not target.startswith(server.ADMIN_PREFIX):
                    await asyncio.sleep(self.latency_s)
                data = server._dumps(payload) if payload is not None else b""
                head_out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
                if data:
                    head_out.append("Content-Type: application/json")
                head_out.append(f"Content-Length: {len(data)}")
                head_out.extend(f"{name}: {value}" for name, value in extra.items())
                writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode("latin-1") + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the server stops (SIGTERM): end quietly
            return
        finally:
            writer.close()

    def answer(
        self, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body, extra headers), as the emulator's own handler answers."""
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        problem_json = "application/problem+json" in headers.get("accept", "")
        try:
            body: object = None
            if raw:
                try:
                    body = json.loads(raw.decode("utf-8"), parse_float=Decimal)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise HttpError(400, "invalid", f"the body is not JSON: {exc}") from exc
            if parts.path.startswith(server.ADMIN_PREFIX):
                outcome = self.emulator._admin(method, unquote(parts.path), body)
                return outcome.status, outcome.body, outcome.headers
            if _basic_user(headers.get("authorization", "")) != self.emulator.api_key:
                raise HttpError(
                    401,
                    "unauthorized",
                    "authentication required: HTTP Basic with an API key",
                    headers={"WWW-Authenticate": 'Basic realm="api"'},
                )
            segments = [unquote(s) for s in parts.path.split("/")[1:]]
            status, payload = self.emulator._api(method, segments, query, body)
            return status, payload, {}
        except HttpError as exc:
            outcome = server._error_outcome(exc, problem_json)
            return outcome.status, outcome.body, outcome.headers


def _basic_user(header: str) -> Optional[str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0]


async def serve(latency_s: float) -> None:
    emulator = Emulator(api_key=os.environ.get("EMULATOR_API_KEY", DEFAULT_API_KEY))
    front = Front(emulator, latency_s)
    listener = await asyncio.start_server(front.connection, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    sys.stdout.write(f"http://127.0.0.1:{port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with listener:
        await stop.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per API answer")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
