"""What the state file holds, as Python values: the rows it gives back, the entries a plan
stores, the outcomes a delivery records, and the conversions of its times (epoch seconds)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal, Optional, Union

from slurm_tracker.statuses import OutboxStatus
from slurm_tracker.times import utc_text


def epoch(value: datetime) -> int:
    return int(value.timestamp())


def from_epoch(value: Optional[int]) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


#: ``2026-01-31T23:59:59Z`` (times.utc_text), by its old name here.
iso = utc_text


@dataclass(frozen=True)
class OutboxRow:
    event_key: str
    allocation: str
    sku: str
    quantity: Decimal
    started_at: datetime
    ended_at: datetime
    body: Mapping[str, Any]
    status: OutboxStatus
    attempts: int
    outcome_unknown: bool
    last_error: str
    event_id: Optional[str]
    created_at: datetime
    updated_at: datetime

    @property
    def needs_lookup(self) -> bool:
        """Whether an earlier attempt may have reached the API (look the key up first)."""
        return self.outcome_unknown or self.status == OutboxStatus.SENDING


#: The statuses an OutboxUpdate records: a member, or its plain value.
Settled = Union[
    Literal[OutboxStatus.ACKED, OutboxStatus.DEAD, OutboxStatus.PENDING],
    Literal["acked", "dead", "pending"],
]


@dataclass(frozen=True)
class OutboxUpdate:
    """The outcome of one send, written by :meth:`State.record_outcomes`.

    ``status``: ``acked`` (with the API's ``event_id``), ``dead`` or ``pending``. ``error``
    None keeps the row's last error. ``outcome_unknown`` is sticky (never cleared here).
    ``extra`` is added to the row's attempts (POSTs made beyond the one its mark counted; -1
    for a row marked ``sending`` and never posted).
    """

    event_key: str
    status: Settled
    event_id: Optional[str] = None
    error: Optional[str] = None
    outcome_unknown: bool = False
    extra: int = 0
    found_by_lookup: bool = False  # acked because the look-up found it on the API


@dataclass(frozen=True)
class Progress:
    reported_s: int
    last_end_at: datetime
    final: bool


@dataclass(frozen=True)
class QuarantineEntry:
    """A record that could not be billed this time, to keep (and count) until resolved.

    ``key``: the run's identity text, or a hash of the record's text when it has none.
    ``text``: a snippet of the record (cut to QUARANTINE_TEXT_MAX characters when stored).
    ``remember_run``: the run's identity text when the caller knows the run was never billed
    before (it was submitted after the pruning horizon, so any billing would have left a
    progress row): a progress row of 0 seconds is kept for it, not final, so it is never
    pruned, and a later sane record is billed in full even after the horizon has passed it.
    """

    key: str
    job_id: str
    reason: str
    text: str
    remember_run: str = ""


@dataclass(frozen=True)
class AdoptedEvent:
    """An event the API holds, posted under our key format (see State.adopt)."""

    key: str
    allocation: str
    sku: str
    quantity: Decimal
    run: str  # the run's identity text
    to_s: int  # the run's elapsed seconds billed once this event counts
    started_at: datetime
    ended_at: datetime
    event_id: str


@dataclass(frozen=True)
class QuarantineRow:
    key: str
    job_id: str
    reason: str
    text: str
    first_seen_at: datetime
    last_seen_at: datetime
    times_seen: int
    resolved_at: Optional[datetime]  # None while open


@dataclass(frozen=True)
class CorrectionSeen:
    """A final run whose ElapsedRaw (``actual_s``) is below the ``billed_s`` seconds billed,
    as a plan found it (corrections.Correction.stored). ``record``: corrections.record_json."""

    run: str
    job_id: str
    allocations: tuple[str, ...]
    skus: tuple[str, ...]
    billed_s: int
    actual_s: int
    record: str


@dataclass(frozen=True)
class CorrectionRow:
    """A correction as the state file holds it (status open, applied or dismissed)."""

    run: str
    job_id: str
    allocations: tuple[str, ...]
    skus: tuple[str, ...]
    billed_s: int
    actual_s: int
    record: str
    status: str
    removed: str  # JSON: stretches an apply deleted on the API (corrections.stretches_json)
    attempts: int
    note: str
    first_seen_at: datetime
    last_seen_at: datetime
    times_seen: int
    updated_at: datetime
    resolved_at: Optional[datetime]


@dataclass(frozen=True)
class StatusSnapshot:
    """What ``slurm-tracker status`` shows of the state file (State.status_snapshot)."""

    high_water_at: Optional[datetime]
    outbox: dict[str, int]  # events per status, every status (state_schema.STATUSES order)
    oldest_waiting_at: Optional[datetime]  # when the oldest pending or sending event was stored
    quarantined: int  # open quarantine entries
    open_corrections: int
    acked_since: tuple[list[tuple[str, str, Decimal, int]], ...]  # totals_since, per ``since``
    last_sync: Optional[dict[str, Any]]  # State.last_sync


def outbox_row(r: Sequence[Any]) -> OutboxRow:
    """An OutboxRow from a row of ``state_schema.OUTBOX_COLUMNS``."""
    started = from_epoch(r[4])
    ended = from_epoch(r[5])
    created = from_epoch(r[12])
    updated = from_epoch(r[13])
    assert started and ended and created and updated
    return OutboxRow(
        event_key=r[0],
        allocation=r[1],
        sku=r[2],
        quantity=Decimal(r[3]),
        started_at=started,
        ended_at=ended,
        body=json.loads(r[6]) if r[6] else {},  # '' once acknowledged (compacted)
        status=OutboxStatus(r[7]),
        attempts=r[8],
        outcome_unknown=bool(r[9]),
        last_error=r[10],
        event_id=r[11],
        created_at=created,
        updated_at=updated,
    )


def correction_row(r: Sequence[Any]) -> CorrectionRow:
    """A CorrectionRow from a row of ``state_schema.CORRECTION_COLUMNS``."""
    first, last, updated = from_epoch(r[11]), from_epoch(r[12]), from_epoch(r[14])
    assert first is not None and last is not None and updated is not None
    return CorrectionRow(
        run=r[0],
        job_id=r[1],
        allocations=tuple(json.loads(r[2])),
        skus=tuple(json.loads(r[3])),
        billed_s=r[4],
        actual_s=r[5],
        record=r[6],
        status=r[7],
        removed=r[8],
        attempts=r[9],
        note=r[10],
        first_seen_at=first,
        last_seen_at=last,
        times_seen=r[13],
        updated_at=updated,
        resolved_at=from_epoch(r[15]),
    )
