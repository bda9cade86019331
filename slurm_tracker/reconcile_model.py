"""The values of a reconcile: what is found about a run and SKU (:class:`Finding`), the totals
per allocation and SKU, the fix of a run and SKU, and the whole :class:`Report` (see
reconcile.py for what each kind of finding means)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from slurm_tracker import inputs
from slurm_tracker.ledger import BilledEvent
from slurm_tracker.models import PlannedEvent

KINDS = (
    "missing",
    "duplicate",
    "overlap",
    "over-billed",
    "unknown-run",
    "misrouted",
    "other-agent",
)
#: Kinds that are reported but are not, by themselves, a discrepancy (exit code 6).
NOTICES = frozenset({"other-agent"})


@dataclass(frozen=True)
class Finding:
    """One discrepancy (or notice) about a run and SKU; ``keys``: the events concerned."""

    kind: str
    run: str
    job_id: str
    allocation: str
    sku: str
    from_s: int
    to_s: int
    quantity: Decimal
    keys: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class Total:
    """Per allocation and SKU, over the runs judged: what should be billed, what is."""

    allocation: str
    sku: str
    expected: Decimal
    billed: Decimal
    events: int


@dataclass(frozen=True)
class Deletion:
    event: BilledEvent
    reason: str


@dataclass(frozen=True)
class Fix:
    """The repair of one run and SKU: events to delete, then events to post."""

    run: str
    sku: str
    deletions: tuple[Deletion, ...]
    posts: tuple[PlannedEvent, ...]
    kept_keys: frozenset[str]


@dataclass(frozen=True)
class Report:
    window: inputs.Window
    agent: str
    runs: int  # runs judged
    events: int  # our cluster's events read
    findings: tuple[Finding, ...]
    totals: tuple[Total, ...]
    fixes: tuple[Fix, ...]
    not_judged: tuple[tuple[str, str], ...] = ()  # (job id, why)
    old_agent: int = 0  # events of the older Go agent counted as billing (migrate state)

    @property
    def discrepancies(self) -> int:
        return sum(1 for f in self.findings if f.kind not in NOTICES)
