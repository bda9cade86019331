"""Corrections: slurmdbd's numbers for a run shrank below what was already billed.

An admin fixing runaway jobs (``sacctmgr show runaway``) sets their End (to the latest of
Start, Eligible and Submit) and their state to COMPLETED: ElapsedRaw drops, often to 0, below
what the agent billed while slurmdbd showed the job running. Usage is never taken back
silently. The plan stage records such a run as a correction (``detect``: a final run whose
ElapsedRaw is below the seconds already billed), the state file keeps it in the same
transaction as the rest of the plan, and it is applied only when an operator asks
(``slurm-tracker corrections apply --yes``, or ``corrections.apply: true`` in the config).

Applying one corrects the API's record of the run: every event carrying our key for the run
whose stretch reaches beyond slurmdbd's seconds now is deleted, and the still valid part of
each, ``[from_s, actual_s)``, is posted again with a proper key (``plan_fix`` and
``replacements``, pure; ``correcting`` does the I/O). Why not a negative event: the contract's
``PostUsageEventInput.quantity`` is a plain ``number`` (no ``minimum``, where rates and totals
have ``minimum: 0``), so the schema would let one through, but nothing says how the platform
rates or totals it; and it would leave the over-billed event in place, so the API's events
of the run would no longer tile ``[0, ElapsedRaw)`` once (what reconcile and a rebuilt state
file read back). The delete endpoint is in the contract and already used by reconcile.

Everything here takes plain values and returns plain values: no clock, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Optional

from slurm_tracker.billing_metrics import Amount, active
from slurm_tracker.config import METADATA_FIELDS
from slurm_tracker.events import plan
from slurm_tracker.ledger import BilledEvent
from slurm_tracker.models import (
    JobRecord,
    Metric,
    PlannedEvent,
    RunKey,
    Skipped,
    SkuCharge,
    Tres,
)
from slurm_tracker.segments import split
from slurm_tracker.state import CorrectionSeen

#: The fields of a record kept with a correction (besides the metadata fields the config sends):
#: what is needed to post the valid part of a deleted event again, exactly as a sync would.
_RECORD_FIELDS = (
    "cluster",
    "job_id",
    "job_id_raw",
    "elapsed_s",
    "state",
    "account",
    "partition",
    "user",
    "line",
)


@dataclass(frozen=True)
class Correction:
    """A final run whose ElapsedRaw (``actual_s``) is below the ``billed_s`` seconds already
    billed. ``allocation`` and ``charges``: where the current mapping bills it."""

    record: JobRecord
    billed_s: int
    allocation: str
    charges: tuple[SkuCharge, ...]
    metadata_fields: tuple[str, ...] = ()  # the config's: what the state keeps of the record

    @property
    def run(self) -> RunKey:
        return self.record.run

    @property
    def actual_s(self) -> int:
        return self.record.elapsed_s

    @property
    def skipped(self) -> Skipped:
        record = self.record
        return Skipped(
            record.job_id,
            "over-billed: recorded as a correction (slurmdbd now says elapsed "
            f"{record.elapsed_s} s, below the {self.billed_s} s already billed; see "
            "`slurm-tracker corrections list`: applied only by `corrections apply --yes` or "
            "with corrections.apply: true)",
            record.run,
        )

    def stored(self) -> CorrectionSeen:
        """What the state file records of it."""
        record = self.record
        return CorrectionSeen(
            run=record.run.text,
            job_id=record.job_id,
            allocations=(self.allocation,),
            skus=tuple(dict.fromkeys(c.sku for c in self.charges)),
            billed_s=self.billed_s,
            actual_s=record.elapsed_s,
            record=record_json(record, self.metadata_fields),
        )


def detect(
    record: JobRecord,
    billed_s: int,
    allocation: str,
    charges: Sequence[SkuCharge],
    metadata_fields: Sequence[str] = (),
) -> Optional[Correction]:
    """The correction of ``record`` when it is final and its ElapsedRaw is below ``billed_s``
    (the run's progress: seconds already billed), else None.

    A running record never makes one: its ElapsedRaw may still grow, and a running record read
    while slurmdbd catches up is held back (sacct.lag), not billed."""
    if not record.final or record.start_at is None or billed_s <= max(record.elapsed_s, 0):
        return None
    return Correction(record, billed_s, allocation, tuple(charges), tuple(metadata_fields))


# ------------------------------------------------------------------------ kept in the state


def _epoch(value: Optional[datetime]) -> Optional[int]:
    return None if value is None else int(value.timestamp())


def _time(value: Any) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(int(value), timezone.utc)


def record_json(record: JobRecord, metadata_fields: Sequence[str] = ()) -> str:
    """What the state keeps of ``record``: its identity, times, TRES, and the fields its events'
    metadata carry (``metadata_fields``, the config's: the job name only when it is sent)."""
    data: dict[str, Any] = {name: getattr(record, name) for name in _RECORD_FIELDS}
    data.update(
        submit_at=_epoch(record.submit_at),
        start_at=_epoch(record.start_at),
        end_at=_epoch(record.end_at),
        tres=_tres_json(record.tres),
        job_name=record.job_name if "job_name" in metadata_fields else "",
        extra={
            field: record.extra[field]
            for field in (METADATA_FIELDS[n] for n in metadata_fields if n != "job_name")
            if field in record.extra
        },
    )
    return json.dumps(data, sort_keys=True)


def _tres_json(tres: Tres) -> dict[str, Any]:
    """A run's TRES as kept: one key per billing metric (its field), memory as a string (an
    exact Decimal), counts as numbers."""
    return {
        spec.field: str(tres.amount(spec.name)) if spec.amount == "size" else tres.amount(spec.name)
        for spec in active()
    }


def _tres_from_json(kept: Mapping[str, Any]) -> Tres:
    """The TRES :func:`_tres_json` kept. A metric the row has no key for is 0 (the row was
    written before the metric was added); a key no metric has is ignored (written by a newer
    version): rows are read both ways."""
    amounts: dict[str, Amount] = {}
    for spec in active():
        if spec.field in kept:
            value = kept[spec.field]
            amounts[spec.name] = Decimal(str(value)) if spec.amount == "size" else int(value)
    return Tres.of(amounts)


def record_from_json(text: str) -> JobRecord:
    """The record ``record_json`` kept (ValueError when the text is not one)."""
    try:
        data = json.loads(text)
        tres = dict(data["tres"])
        submit_at = _time(data["submit_at"])
        if submit_at is None:
            raise ValueError("no submit time")
        return JobRecord(
            cluster=str(data["cluster"]),
            job_id=str(data["job_id"]),
            job_id_raw=str(data["job_id_raw"]),
            submit_at=submit_at,
            start_at=_time(data["start_at"]),
            end_at=_time(data["end_at"]),
            elapsed_s=int(data["elapsed_s"]),
            state=str(data["state"]),
            account=str(data["account"]),
            partition=str(data["partition"]),
            user=str(data["user"]),
            tres=_tres_from_json(tres),
            job_name=str(data.get("job_name", "")),
            line=int(data.get("line", 0)),
            extra={str(k): str(v) for k, v in dict(data.get("extra", {})).items()},
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ValueError(f"not a record kept with a correction: {exc}") from exc


@dataclass(frozen=True, order=True)
class Stretch:
    """Elapsed seconds ``[from_s, to_s)`` of a run, billed to an allocation under a SKU."""

    allocation: str
    sku: str
    from_s: int
    to_s: int


def stretches_json(stretches: Iterable[Stretch]) -> str:
    return json.dumps([[s.allocation, s.sku, s.from_s, s.to_s] for s in sorted(set(stretches))])


def stretches_from_json(text: str) -> list[Stretch]:
    try:
        return [Stretch(str(a), str(s), int(f), int(t)) for a, s, f, t in json.loads(text or "[]")]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a list of stretches: {exc}") from exc


# ------------------------------------------------------------------------ applying


@dataclass(frozen=True)
class Fix:
    """What applying a correction does on the API: delete, then post.

    ``removed``: every stretch deleted for the run, by this attempt and earlier ones (kept in
    the state before anything is deleted: if the process dies after the deletion, the next
    attempt still knows what to post again)."""

    run: str
    actual_s: int
    deletions: tuple[BilledEvent, ...]
    posts: tuple[Stretch, ...]
    removed: tuple[Stretch, ...]

    @property
    def nothing_to_do(self) -> bool:
        return not self.deletions and not self.posts


def _merge(stretches: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(s for s in stretches if s[0] < s[1]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _minus(
    wanted: Sequence[tuple[int, int]], covered: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of ``wanted`` (merged) that no stretch of ``covered`` covers."""
    holes = _merge(covered)
    out: list[tuple[int, int]] = []
    for a, b in wanted:
        at = a
        for c, d in holes:
            if d <= at or c >= b:
                continue
            if c > at:
                out.append((at, c))
            at = max(at, d)
        if at < b:
            out.append((at, b))
    return out


def plan_fix(
    run: str, actual_s: int, events: Iterable[BilledEvent], removed_before: Iterable[Stretch] = ()
) -> Fix:
    """The fix of a run's events (ledger.BilledEvent) once slurmdbd says ``actual_s``.

    Only events carrying our key for ``run`` are considered. Those whose stretch reaches
    beyond ``actual_s`` are deleted (every copy). Per allocation and SKU, what the deleted
    events (and ``removed_before``, the stretches earlier attempts deleted) billed below
    ``actual_s`` is posted again, less what the remaining events already bill: nothing is
    billed twice, nothing valid is lost, whichever step an earlier attempt stopped at.
    """
    ours = [e for e in events if e.run == run]
    doomed = sorted((e for e in ours if e.parts.to_s > actual_s), key=lambda e: (e.key, e.cost_id))
    kept = [e for e in ours if e.parts.to_s <= actual_s]
    removed = set(removed_before)
    removed.update(Stretch(e.allocation, e.parts.sku, e.parts.from_s, e.parts.to_s) for e in doomed)
    posts: list[Stretch] = []
    for allocation, sku in sorted({(s.allocation, s.sku) for s in removed}):
        wanted = _merge(
            (s.from_s, min(s.to_s, actual_s))
            for s in removed
            if (s.allocation, s.sku) == (allocation, sku)
        )
        covered = (
            (e.parts.from_s, e.parts.to_s)
            for e in kept
            if (e.allocation, e.parts.sku) == (allocation, sku)
        )
        posts += [Stretch(allocation, sku, a, b) for a, b in _minus(wanted, covered)]
    return Fix(run, actual_s, tuple(doomed), tuple(posts), tuple(sorted(removed)))


def metric_of(value: object) -> Optional[Metric]:
    """A metric name read from an event's metadata, if it is one (billing_metrics)."""
    return value if isinstance(value, str) and value in active() else None


def replacements(
    record: JobRecord,
    stretches: Sequence[Stretch],
    metrics: Mapping[tuple[str, str], Metric],
    *,
    metadata_fields: Sequence[str] = (),
    agent: str = "",
    cuts: Callable[[str, datetime, datetime], Sequence[datetime]] = lambda _s, _a, _b: (),
) -> list[PlannedEvent]:
    """The events that post ``stretches`` of ``record`` again, as a sync would plan them: cut
    at month starts (and at ``cuts(sku, begin, end)``, rate-rule changes), keys
    ``st1:<cluster>:<jobidraw>:<submit>:<from>-<to>:<sku>``, quantities from the record's TRES.
    ``metrics``: the metric of each (allocation, sku) (KeyError when one is missing)."""
    assert record.start_at is not None
    events: list[PlannedEvent] = []
    for stretch in stretches:
        charge = SkuCharge(stretch.sku, metrics[(stretch.allocation, stretch.sku)])
        begin_at = record.start_at + timedelta(seconds=stretch.from_s)
        end_at = record.start_at + timedelta(seconds=stretch.to_s)
        segments = split(record, stretch.from_s, stretch.to_s, cuts(stretch.sku, begin_at, end_at))
        planned = plan(segments, stretch.allocation, (charge,), metadata_fields, agent)
        events += [replace(p, metadata={**p.metadata, "correction": True}) for p in planned]
    return events
