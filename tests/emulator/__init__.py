"""A local Allocations API emulator with fault injection (stdlib only). See ``server.py``."""

from __future__ import annotations

from tests.emulator.server import (
    DEFAULT_API_KEY,
    DEFAULT_CATALOG,
    DEFAULT_ORGANIZATION,
    AdminClient,
    Emulator,
    EmulatorProcess,
    Fault,
    StoredEvent,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_CATALOG",
    "DEFAULT_ORGANIZATION",
    "AdminClient",
    "Emulator",
    "EmulatorProcess",
    "Fault",
    "StoredEvent",
]
