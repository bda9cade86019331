"""What a pass over sacct output decided (:class:`Plan`), and its sums per allocation and SKU.

Value types and pure helpers shared by planning (planning.py), the sync (pipeline.py), the
backfill and the reports: a Plan holds the events, skipped runs and rejected records of one
batch; :class:`Totals` adds events up as they stream by; :func:`merge_plans` joins batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Optional

from slurm_tracker.corrections import Correction
from slurm_tracker.models import Metric, PlannedEvent, Rejected, RunKey, Skipped


@dataclass(frozen=True)
class Plan:
    """Everything one pass over the input decided. Each record ends in exactly one list
    (events may hold several per record)."""

    events: tuple[PlannedEvent, ...]
    skipped: tuple[Skipped, ...]
    rejected: tuple[Rejected, ...]
    rating_problems: tuple[str, ...] = ()
    records: int = 0
    steps_ignored: int = 0
    held: frozenset[str] = frozenset()  # keys of events held for an operator (limits.hold_above)
    checked_runs: frozenset[str] = frozenset()  # runs found plausible: their quarantine resolves
    # final runs whose ElapsedRaw is below what was billed (see corrections.py), and final runs
    # billed before whose ElapsedRaw is not (run text, ElapsedRaw): an open correction of theirs
    # is out of date
    corrections: tuple[Correction, ...] = ()
    final_seen: tuple[tuple[str, int], ...] = ()
    read_rejected: int = 0  # the first ones of ``rejected`` were refused by the reader


@dataclass(frozen=True)
class Total:
    allocation: str
    sku: str
    metric: Metric
    quantity: Decimal
    events: int
    unit: Optional[str] = None
    amount: Optional[Decimal] = None
    usd: Optional[Decimal] = None


class Totals:
    """Per allocation and SKU: quantity, rated amount and USD, summed event by event (the
    same additions in the same order as over a list of every event, so the same Decimals)."""

    def __init__(self) -> None:
        # (allocation, sku) -> [metric, events, quantity, rated events, unit of the first rated,
        #                       amount, events with a USD value, usd]
        self._groups: dict[tuple[str, str], list[Any]] = {}

    def add(self, events: Iterable[PlannedEvent]) -> None:
        groups = self._groups
        for event in events:
            group = groups.get((event.allocation, event.sku))
            if group is None:
                group = groups[(event.allocation, event.sku)] = [
                    event.metric, 0, Decimal(0), 0, None, Decimal(0), 0, Decimal(0)
                ]  # fmt: skip
            group[1] += 1
            group[2] += event.quantity
            rated = event.rated
            if rated is not None:
                if group[3] == 0:
                    group[4] = rated.unit
                group[3] += 1
                group[5] += rated.amount
                if rated.usd is not None:
                    group[6] += 1
                    group[7] += rated.usd

    def result(self) -> list[Total]:
        result = []
        for (allocation, sku), group in sorted(self._groups.items()):
            metric, events, quantity, rated, unit, amount, with_usd, usd = group
            all_rated = rated == events
            result.append(
                Total(
                    allocation=allocation,
                    sku=sku,
                    metric=metric,
                    quantity=quantity,
                    events=events,
                    unit=unit if all_rated and rated else None,
                    amount=amount if all_rated else None,
                    usd=usd if all_rated and with_usd == rated else None,
                )
            )
        return result


def totals(events: Sequence[PlannedEvent]) -> list[Total]:
    """Per allocation and SKU: quantity, rated amount and USD (sums of the per-event values)."""
    found = Totals()
    found.add(events)
    return found.result()


def merge_plans(plans: Sequence[Plan]) -> Plan:
    """The plans of several batches (or backfill chunks) as one."""
    return Plan(
        events=tuple(e for p in plans for e in p.events),
        skipped=tuple(s for p in plans for s in p.skipped),
        rejected=tuple(r for p in plans for r in p.rejected),
        rating_problems=tuple(x for p in plans for x in p.rating_problems),
        records=sum(p.records for p in plans),
        steps_ignored=sum(p.steps_ignored for p in plans),
        held=frozenset(k for p in plans for k in p.held),
        checked_runs=frozenset(r for p in plans for r in p.checked_runs),
        corrections=tuple(c for p in plans for c in p.corrections),
        final_seen=tuple(f for p in plans for f in p.final_seen),
    )


def reported_after(plan: Plan, before: Mapping[RunKey, int]) -> dict[RunKey, int]:
    """What will have been reported per run once ``plan`` is stored (for chained dry runs)."""
    after = dict(before)
    for event in plan.events:
        after[event.run] = max(after.get(event.run, 0), event.to_s)
    return after
