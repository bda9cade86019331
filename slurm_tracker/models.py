"""Plain values passed between the stages of the data flow (see DESIGN.md).

All datetimes are timezone-aware UTC and named ``*_at``; durations are integer seconds
(``*_s``); quantities and money are ``Decimal``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from typing import Literal, Optional, Union

Metric = Literal["cpu", "gpu", "node", "mem", "billing"]
METRICS: tuple[Metric, ...] = ("cpu", "gpu", "node", "mem", "billing")

#: What one unit of each metric's usage is called, for people.
METRIC_UNITS: Mapping[Metric, str] = {
    "cpu": "core-hours",
    "gpu": "GPU-hours",
    "node": "node-hours",
    "mem": "GB-hours",
    "billing": "billing-hours",
}

MIB_PER_GB = Decimal(1024)  # Slurm's "G" is 1024 MiB; memory GB-hours use the same GB.


@dataclass(frozen=True)
class Tres:
    """Allocated trackable resources of a job run (AllocTRES / ``tres.allocated``)."""

    cpu: int = 0
    mem_mb: Decimal = Decimal(0)  # MiB, as Slurm counts it
    node: int = 0
    gpu: int = 0  # all GPU types together, never counted twice
    billing: int = 0

    def count(self, metric: Metric) -> Decimal:
        """How many of ``metric`` the run holds; memory in GB (1024 MiB)."""
        if metric == "mem":
            return self.mem_mb / MIB_PER_GB
        return Decimal(getattr(self, metric))


@dataclass(frozen=True)
class RunKey:
    """One job run: JobIDRaw repeats across clusters and wraps; a requeue resets Submit."""

    cluster: str
    job_id_raw: str
    submit_at: datetime

    @cached_property
    def text(self) -> str:
        # computed once per key (cached in the instance's __dict__, outside the fields)
        return f"{self.cluster}:{self.job_id_raw}:{int(self.submit_at.timestamp())}"


@dataclass(frozen=True)
class JobRecord:
    """One allocation record (one job run) read from sacct."""

    cluster: str
    job_id: str  # as shown to users: 123, 123_4, 123+0
    job_id_raw: str
    submit_at: datetime
    start_at: Optional[datetime]  # None while pending
    end_at: Optional[datetime]  # None while the run may still grow
    elapsed_s: int  # ElapsedRaw: wall time minus suspended time
    state: str  # first word of the state, e.g. COMPLETED, CANCELLED, a future state
    account: str
    partition: str
    user: str
    tres: Tres
    job_name: str = ""
    line: int = 0  # where the record started in the input (1-based), for messages
    extra: Mapping[str, str] = field(default_factory=dict)  # other sacct fields, by name

    @cached_property
    def run(self) -> RunKey:
        # one RunKey per record, made on first use (every stage asks for it)
        return RunKey(self.cluster, self.job_id_raw, self.submit_at)

    @property
    def final(self) -> bool:
        """A run is final once its End is known: its ElapsedRaw will not grow any more."""
        return self.end_at is not None


@dataclass(frozen=True)
class Rejected:
    """A malformed or implausible record: counted, shown, quarantined, never billed, never
    fatal. ``run`` and ``job_id`` are set when the record's identity could be read."""

    line: int
    reason: str
    text: str = ""
    job_id: str = ""
    run: Optional[RunKey] = None

    @property
    def key(self) -> str:
        """Its quarantine key: the run when known (a later sane record of it resolves the
        entry), else a digest of the record's text."""
        if self.run is not None:
            return self.run.text
        return "record:" + hashlib.sha256(self.text.encode("utf-8", "replace")).hexdigest()[:24]


@dataclass(frozen=True)
class ParseResult:
    records: tuple[JobRecord, ...]
    rejected: tuple[Rejected, ...]
    steps_ignored: int = 0


@dataclass(frozen=True)
class Skipped:
    """A job run that produces no event this time, and why."""

    job_id: str
    reason: str
    run: Optional[RunKey] = None


@dataclass(frozen=True)
class UsageSegment:
    """New usage of one run: elapsed seconds [from_s, to_s) at wall-clock [started_at, ended_at)."""

    record: JobRecord
    from_s: int
    to_s: int
    started_at: datetime
    ended_at: datetime

    @property
    def seconds(self) -> int:
        return self.to_s - self.from_s


@dataclass(frozen=True)
class SkuCharge:
    """What a partition is billed as: a SKU code and the metric its quantity counts."""

    sku: str
    metric: Metric = "cpu"


@dataclass(frozen=True)
class Rated:
    """What the embedded rating engine says an event costs."""

    unit: str
    amount: Decimal  # in the allocation's unit
    usd: Optional[Decimal]  # when the unit is rated in USD
    sku_rate: Decimal = Decimal(1)
    unit_rate: Optional[Decimal] = None


@dataclass(frozen=True)
class PlannedEvent:
    """One usage event, ready to be stored in the outbox and posted."""

    event_key: str
    allocation: str
    sku: str
    metric: Metric
    quantity: Decimal
    started_at: datetime
    ended_at: datetime
    user: str
    metadata: Mapping[str, Union[str, int]]
    run: RunKey
    to_s: int  # the run's elapsed seconds reported once this event is stored
    final: bool
    rated: Optional[Rated] = None
