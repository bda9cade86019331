"""Plain values passed between the stages of the data flow (see DESIGN.md).

All datetimes are timezone-aware UTC and named ``*_at``; durations are integer seconds
(``*_s``); quantities and money are ``Decimal``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from typing import Any, Optional, Union, cast

from slurm_tracker.billing_metrics import MIB_PER_GB, Amount, active

__all__ = [  # MIB_PER_GB: re-exported from billing_metrics, where it is defined
    "METRICS",
    "METRIC_UNITS",
    "MIB_PER_GB",
    "Amount",
    "JobRecord",
    "Metric",
    "ParseResult",
    "PlannedEvent",
    "Rated",
    "Rejected",
    "RunKey",
    "Skipped",
    "SkuCharge",
    "Tres",
    "UsageSegment",
]


#: A billing metric's name: one of the table's (billing_metrics: cpu, gpu, node, mem, billing).
#: A string, not a Literal, so that a metric added to the table needs nothing here; names
#: read from the config or an event's metadata are checked against the table.
Metric = str


class _MetricNames(Sequence[str]):
    """The names of the metrics in use, in the table's order (read when asked, not at import)."""

    def __getitem__(self, index: Any) -> Any:
        return active().names[index]

    def __len__(self) -> int:
        return len(active().names)

    def __contains__(self, value: object) -> bool:
        return value in active()

    def __repr__(self) -> str:
        return repr(active().names)


class _MetricUnits(Mapping[str, str]):
    """What one unit of each metric's usage is called, for people (from the table in use)."""

    def __getitem__(self, metric: str) -> str:
        return active()[metric].unit

    def __iter__(self) -> Iterator[str]:
        return iter(active().names)

    def __len__(self) -> int:
        return len(active().names)


#: The metric names (``cpu``, ``gpu``, ``node``, ``mem``, ``billing``): billing_metrics.active().
METRICS: Sequence[Metric] = _MetricNames()

#: What one unit of each metric's usage is called, for people: "core-hours"...
METRIC_UNITS: Mapping[Metric, str] = _MetricUnits()


class Tres:
    """Allocated trackable resources of a job run (AllocTRES / ``tres.allocated``): how much of
    each billing metric's TRES it holds (billing_metrics), as the TRES counts it (memory in
    MiB, as Slurm counts it; GPUs of all types together, never counted twice).

    Immutable and compared by value (a metric it does not hold is 0). Made with the metrics'
    fields, ``Tres(cpu=48, mem_mb=Decimal(393216), node=1, gpu=4, billing=78)``, or by metric
    name with :meth:`of`. Read with ``tres.cpu``, ``tres.mem_mb``, ``tres.node``, ``tres.gpu``,
    ``tres.billing`` (the built-in metrics), or for any metric :meth:`amount` and :meth:`count`.
    """

    __slots__ = ("_amounts",)
    _amounts: dict[str, Amount]  # by metric name; a metric not here is 0

    def __init__(self, **fields: Amount) -> None:
        registry = active()
        amounts: dict[str, Amount] = {}
        for name, value in fields.items():
            spec = registry.by_field(name)
            if spec is None:
                raise TypeError(f"Tres() got an unexpected keyword argument {name!r}")
            amounts[spec.name] = value
        object.__setattr__(self, "_amounts", amounts)

    @classmethod
    def of(cls, amounts: Mapping[str, Amount]) -> Tres:
        """The TRES holding ``amounts`` by metric name (the decoder's way: names not checked)."""
        tres = object.__new__(cls)
        object.__setattr__(tres, "_amounts", dict(amounts))
        return tres

    def amount(self, metric: Metric) -> Amount:
        """How much of ``metric``'s TRES the run holds, as the TRES counts it (memory: MiB)."""
        found = self._amounts.get(metric)
        return active()[metric].zero if found is None else found

    def count(self, metric: Metric) -> Decimal:
        """How many units of ``metric`` the run holds (the amount / the metric's ``per``:
        memory in GB of 1024 MiB). KeyError: not a metric."""
        spec = active()[metric]
        found = self._amounts.get(metric, 0)
        return Decimal(found) if spec.per is None else Decimal(found) / spec.per

    @property
    def cpu(self) -> int:
        return cast(int, self._amounts.get("cpu", 0))

    @property
    def mem_mb(self) -> Decimal:
        return cast(Decimal, self._amounts.get("mem", _NO_MEMORY))

    @property
    def node(self) -> int:
        return cast(int, self._amounts.get("node", 0))

    @property
    def gpu(self) -> int:
        return cast(int, self._amounts.get("gpu", 0))

    @property
    def billing(self) -> int:
        return cast(int, self._amounts.get("billing", 0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tres):
            return NotImplemented
        mine, theirs = self._amounts, other._amounts
        return all(mine.get(k, 0) == theirs.get(k, 0) for k in mine.keys() | theirs.keys())

    def __hash__(self) -> int:
        return hash(frozenset((k, v) for k, v in self._amounts.items() if v))

    def __repr__(self) -> str:
        registry = active()
        shown = []
        for name, value in self._amounts.items():
            spec = registry.get(name)
            shown.append(f"{spec.field if spec else name}={value!r}")
        return f"Tres({', '.join(shown)})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Tres is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Tres is immutable: cannot delete {name}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Tres.of, (dict(self._amounts),))


_NO_MEMORY = Decimal(0)


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
