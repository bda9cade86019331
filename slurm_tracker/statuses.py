"""Named values: the statuses of an outbox row and the outcomes of a sync.

Both are ``str`` enums, so that a member IS its value for every existing use: it compares and
hashes equal to the plain string (a status read from the state file is a plain ``str``), and
``json.dumps``, ``str()``, ``%s`` and f-strings (with or without a format spec) give the plain
value. Python 3.12 changed ``format()`` of mixed-in enums to the member's name, hence the
explicit ``__str__`` and ``__format__``.
"""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A ``str`` enum shown as its value everywhere (Python 3.9 to 3.13 alike)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class OutboxStatus(_Named):
    """Where an event of the outbox stands (state.py's docstring tells the whole story).

    Defined in the order the state reports its counts (``state.STATUSES``).
    """

    PENDING = "pending"  # to send
    HELD = "held"  # implausibly large: sent only once an operator releases it
    SENDING = "sending"  # an attempt may be in flight: look the key up before sending again
    ACKED = "acked"  # the API has it
    DEAD = "dead"  # the API refused it permanently
    DROPPED = "dropped"  # an operator gave it up (or it was deleted on the API)


class SyncOutcome(_Named):
    """How a sync (or backfill) ended, as the ``syncs`` table records it."""

    OK = "ok"  # everything planned is delivered
    UNDELIVERED = "undelivered"  # pending, held or dead events remain (exit 4)
    UNAVAILABLE = "unavailable"  # the API could not be reached (exit 75)
    AUTH = "auth"  # the API refused the key (exit 1)
    FAILED = "failed"  # anything else that stopped it (with its exit code and reason)


#: Outbox statuses of events not delivered yet (counted as waiting by status and metrics).
WAITING = (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.HELD, OutboxStatus.DEAD)
#: What a delivery pass sends: pending rows, and sending ones (looked up first).
TO_SEND = (OutboxStatus.PENDING, OutboxStatus.SENDING)
