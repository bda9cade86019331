"""Run the emulator as a process: ``python -m tests.emulator --port 0 [--state-file PATH]``.

The first line on stdout is the base URL (``http://127.0.0.1:PORT``); it then serves until
SIGTERM or SIGINT. The API key is ``$EMULATOR_API_KEY`` (default: ``DEFAULT_API_KEY``);
``--catalog`` is a JSON file in the format of ``DEFAULT_CATALOG``; ``--latency SECONDS`` delays
every API answer (benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from tests.emulator.server import (
    DEFAULT_API_KEY,
    DEFAULT_MAX_PAGE_SIZE,
    DEFAULT_ORGANIZATION,
    Emulator,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    parser.add_argument("--state-file", type=Path, help="keep accepted events in this file")
    parser.add_argument("--catalog", type=Path, help="a JSON catalog (default: a small one)")
    parser.add_argument("--organization", default=DEFAULT_ORGANIZATION)
    parser.add_argument("--max-page-size", type=int, default=DEFAULT_MAX_PAGE_SIZE)
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every API answer"
    )
    args = parser.parse_args(argv)

    catalog = json.loads(args.catalog.read_text(encoding="utf-8")) if args.catalog else None
    emulator = Emulator(
        catalog,
        organization=args.organization,
        api_key=os.environ.get("EMULATOR_API_KEY", DEFAULT_API_KEY),
        host=args.host,
        port=args.port,
        state_file=args.state_file,
        max_page_size=args.max_page_size,
        latency_s=args.latency,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    url = emulator.start()
    sys.stdout.write(url + "\n")
    sys.stdout.flush()
    try:
        while not done.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
