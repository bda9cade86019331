"""The judge of one run sacct returned, and of its events on the API (:class:`Judge`): what the
billing path would bill now, what is missing, doubled, overlapping, over-billed or misrouted,
and the fix (see reconcile.py); with the stretch arithmetic and the greedy choice of the events
to keep that the repair of runs it cannot judge shares. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Optional

from slurm_tracker import rating
from slurm_tracker.config import Config
from slurm_tracker.events import QUANTUM, plan
from slurm_tracker.ledger import BilledEvent, LegacyEvent
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import JobRecord, PlannedEvent
from slurm_tracker.reconcile_model import Deletion, Finding, Fix
from slurm_tracker.segments import SegmentPolicy, split

_NEVER = datetime.max.replace(tzinfo=timezone.utc)


def age_order(event: BilledEvent) -> tuple[bool, datetime, str, str]:
    """Greedy order: earliest createdAt first (unknown last), then key, then id."""
    created = event.created_at
    return (created is None, created or _NEVER, event.key, event.cost_id)


def event_finding(kind: str, event: BilledEvent, job_id: str, detail: str) -> Finding:
    parts = event.parts
    return Finding(
        kind=kind,
        run=event.run,
        job_id=job_id or parts.job_id_raw,
        allocation=event.allocation,
        sku=parts.sku,
        from_s=parts.from_s,
        to_s=parts.to_s,
        quantity=event.quantity,
        keys=(event.key,),
        detail=detail,
    )


def duplicates(events: Sequence[BilledEvent], job_id: str) -> list[Finding]:
    by_key: dict[str, list[BilledEvent]] = {}
    for event in sorted(events, key=age_order):
        by_key.setdefault(event.key, []).append(event)
    return [
        replace(
            event_finding("duplicate", copies[0], job_id, f"accepted {len(copies)} times"),
            quantity=sum((e.quantity for e in copies[1:]), Decimal(0)),
        )
        for key, copies in sorted(by_key.items())
        if len(copies) > 1
    ]


def _greedy(
    events: Sequence[BilledEvent], overlaps_too: bool
) -> tuple[list[BilledEvent], list[Deletion]]:
    """Keep events in :func:`age_order` that neither repeat a kept key nor (``overlaps_too``)
    overlap a kept stretch; the rest are to delete, each with the kept event that proves it."""
    kept: list[BilledEvent] = []
    deletions: list[Deletion] = []
    for event in sorted(events, key=age_order):
        same = next((k for k in kept if k.key == event.key), None)
        if same is not None:
            deletions.append(Deletion(event, f"another copy of {same.key} (kept: {same.cost_id})"))
            continue
        if overlaps_too:
            hit = next((k for k in kept if _common(k, event) is not None), None)
            if hit is not None:
                a, b = _common(hit, event) or (0, 0)
                deletions.append(Deletion(event, f"overlaps {hit.key} over {a}-{b} s (kept)"))
                continue
        kept.append(event)
    return kept, deletions


def _common(a: BilledEvent, b: BilledEvent) -> Optional[tuple[int, int]]:
    lo, hi = max(a.parts.from_s, b.parts.from_s), min(a.parts.to_s, b.parts.to_s)
    return (lo, hi) if lo < hi else None


def _first_common(
    event: BilledEvent, covers: Sequence[tuple[int, int]]
) -> Optional[tuple[int, int]]:
    """The first stretch of ``covers`` that ``event`` overlaps, cut to the common part."""
    for a, b in covers:
        lo, hi = max(a, event.parts.from_s), min(b, event.parts.to_s)
        if lo < hi:
            return lo, hi
    return None


def dedupe_only(run: str, events: Sequence[BilledEvent]) -> list[Fix]:
    """Fixes for runs whose lost usage could not be posted again: extra copies of a key only."""
    fixes = []
    for sku in sorted({e.parts.sku for e in events}):
        group = [e for e in events if e.parts.sku == sku]
        kept, deletions = _greedy(group, overlaps_too=False)
        fixes.append(Fix(run, sku, tuple(deletions), (), frozenset(e.key for e in kept)))
    return fixes


def _gaps(lo: int, hi: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The stretches of ``[lo, hi)`` that no stretch of ``covered`` covers."""
    gaps = []
    at = lo
    for a, b in sorted(covered):
        if at >= hi:
            break
        if a > at:
            gaps.append((at, min(a, hi)))
        at = max(at, b)
    if at < hi:
        gaps.append((at, hi))
    return gaps


class Judge:
    """One run sacct returned, and its events: what is expected, what is wrong, the fix."""

    def __init__(
        self,
        record: JobRecord,
        events: list[BilledEvent],
        config: Config,
        policy: SegmentPolicy,
        floor_at: Optional[datetime],
        catalog: Optional[rating.Catalog],
        agent: str,
    ) -> None:
        self.record = record
        self.events = events
        self.legacy: list[LegacyEvent] = []  # the Go agent's events of the run (add_legacy)
        self.old: list[tuple[int, int]] = []  # the elapsed seconds they billed
        self.config = config
        self.catalog = catalog
        self.agent = agent
        mapped = map_record(record, config.accounts, config.partitions)
        self.target: Optional[Target] = mapped if isinstance(mapped, Target) else None
        self.unmapped = "" if isinstance(mapped, Target) else mapped.reason
        self.charges = {
            c.sku: c
            for c in (self.target.charges if self.target else ())
            if record.tres.count(c.metric) > 0
        }
        elapsed = record.elapsed_s if record.start_at is not None else 0
        self.lo = 0
        if floor_at is not None and record.start_at is not None:
            self.lo = max(0, min(int((floor_at - record.start_at).total_seconds()), elapsed))
        if record.final:
            self.hi = policy.billable_s(record) if record.start_at is not None else 0
        else:  # running: what is billed so far; the tail is the next sync's
            self.hi = min(elapsed, max((e.parts.to_s for e in events), default=0))

    def add_legacy(self, legacy: Sequence[LegacyEvent]) -> None:
        """The Go agent's events of this run: the elapsed seconds they billed count as
        covered for the run's core-hours SKUs (it billed core-hours only)."""
        self.legacy = list(legacy)
        self.old = []
        start, elapsed = self.record.start_at, self.record.elapsed_s
        if start is None:
            return
        for event in self.legacy:
            if event.started_at is None or event.ended_at is None:
                continue
            a = max(0, int((event.started_at - start).total_seconds()))
            b = min(elapsed, int((event.ended_at - start).total_seconds()))
            if a < b:
                self.old.append((a, b))
        if self.old and not self.record.final:
            self.hi = max(self.hi, min(elapsed, max(b for _, b in self.old)))

    def _old_covers(self, sku: str) -> list[tuple[int, int]]:
        charge = self.charges.get(sku)
        return list(self.old) if charge and charge.metric == "cpu" else []

    def _posts(self, sku: str, stretches: Sequence[tuple[int, int]]) -> list[PlannedEvent]:
        """The events a sync would post for ``stretches`` of this run and SKU."""
        record, charge = self.record, self.charges[sku]
        assert self.target is not None and record.start_at is not None
        final = record.final and self.hi == record.elapsed_s
        posts: list[PlannedEvent] = []
        for a, b in stretches:
            cuts: list[datetime] = []
            if self.catalog is not None and sku in self.catalog.skus:
                cuts = rating.boundaries(
                    self.catalog,
                    sku,
                    record.start_at + timedelta(seconds=a),
                    record.start_at + timedelta(seconds=b),
                )
            segments = split(record, a, b, cuts)
            planned = plan(
                segments,
                self.target.allocation,
                (charge,),
                self.config.metadata_fields,
                self.agent,
            )
            posts += [replace(p, to_s=max(p.to_s, self.hi), final=final) for p in planned]
        return posts

    def findings(self) -> list[Finding]:
        record, job = self.record, self.record.job_id
        out: list[Finding] = []
        for sku in sorted(self.charges):
            group = [e for e in self.events if e.parts.sku == sku]
            old = self._old_covers(sku)
            covered = [(e.parts.from_s, e.parts.to_s) for e in group] + old
            for a, b in _gaps(self.lo, self.hi, covered):
                posts = self._posts(sku, [(a, b)])
                if posts:
                    out.append(self._missing(sku, a, b, posts))
            for event in sorted(group, key=age_order):
                hit = _first_common(event, old)
                if hit is not None:
                    out.append(self._over_old(event, hit))
        out += duplicates(self.events, job)
        for sku in sorted({e.parts.sku for e in self.events}):
            firsts: dict[str, BilledEvent] = {}  # one copy per key: copies are duplicates
            for event in sorted(self.events, key=age_order):
                if event.parts.sku == sku:
                    firsts.setdefault(event.key, event)
            group = list(firsts.values())
            for i, first in enumerate(group):
                for second in group[i + 1 :]:
                    common = _common(first, second)
                    if common is not None:
                        out.append(self._overlap(first, second, common))
        for event in sorted(self.events, key=age_order):
            parts = event.parts
            if parts.to_s > record.elapsed_s:
                over_from = max(parts.from_s, record.elapsed_s)
                share = Decimal(parts.to_s - over_from) / Decimal(parts.to_s - parts.from_s)
                out.append(
                    replace(
                        event_finding(
                            "over-billed",
                            event,
                            job,
                            f"billed to {parts.to_s} s; slurmdbd now says ElapsedRaw "
                            f"{record.elapsed_s} s",
                        ),
                        from_s=over_from,
                        quantity=(event.quantity * share).quantize(QUANTUM),
                    )
                )
            why = self._misrouted(event)
            if why:
                out.append(event_finding("misrouted", event, job, why))
        return out

    def _missing(self, sku: str, a: int, b: int, posts: Sequence[PlannedEvent]) -> Finding:
        assert self.target is not None
        return Finding(
            kind="missing",
            run=self.record.run.text,
            job_id=self.record.job_id,
            allocation=self.target.allocation,
            sku=sku,
            from_s=a,
            to_s=b,
            quantity=sum((p.quantity for p in posts), Decimal(0)),
            keys=tuple(p.event_key for p in posts),
            detail="no event covers these elapsed seconds",
        )

    def _overlap(self, first: BilledEvent, second: BilledEvent, common: tuple[int, int]) -> Finding:
        a, b = common
        share = Decimal(b - a) / Decimal(second.parts.to_s - second.parts.from_s)
        return Finding(
            kind="overlap",
            run=self.record.run.text,
            job_id=self.record.job_id,
            allocation=second.allocation,
            sku=second.parts.sku,
            from_s=a,
            to_s=b,
            quantity=(second.quantity * share).quantize(QUANTUM),
            keys=(first.key, second.key),
            detail="two keys bill the same elapsed seconds",
        )

    def _over_old(self, event: BilledEvent, common: tuple[int, int]) -> Finding:
        a, b = common
        share = Decimal(b - a) / Decimal(event.parts.to_s - event.parts.from_s)
        return replace(
            event_finding(
                "overlap",
                event,
                self.record.job_id,
                "bills elapsed seconds the old Go agent already billed (before the cutover)",
            ),
            from_s=a,
            to_s=b,
            quantity=(event.quantity * share).quantize(QUANTUM),
        )

    def _misrouted(self, event: BilledEvent) -> str:
        if self.target is None:
            return f"the mapping bills this run nowhere now: {self.unmapped}"
        if event.allocation != self.target.allocation:
            return f"on allocation {event.allocation}; the mapping gives {self.target.allocation}"
        if event.parts.sku not in self.charges:
            given = ", ".join(sorted(self.charges)) or "none"
            return f"SKU {event.parts.sku} is not billed for this run (the mapping gives {given})"
        return ""

    def fixes(self) -> list[Fix]:
        fixes = []
        for sku in sorted({e.parts.sku for e in self.events} | set(self.charges)):
            group = [e for e in self.events if e.parts.sku == sku]
            if sku not in self.charges:  # nothing could be posted again: copies only
                fixes += dedupe_only(self.record.run.text, group)
                continue
            kept, deletions = _greedy(group, overlaps_too=True)
            old = self._old_covers(sku)
            for event in [e for e in kept if _first_common(e, old) is not None]:
                kept.remove(event)  # it bills again what the old agent billed
                a, b = _first_common(event, old) or (0, 0)
                deletions.append(
                    Deletion(event, f"overlaps the old Go agent's billing over {a}-{b} s")
                )
            covered = [(e.parts.from_s, e.parts.to_s) for e in kept] + old
            gaps = _gaps(self.lo, self.hi, covered)
            posts = tuple(self._posts(sku, gaps))
            fixes.append(
                Fix(
                    self.record.run.text,
                    sku,
                    tuple(deletions),
                    posts,
                    frozenset(e.key for e in kept),
                )
            )
        return fixes

    def totals(self) -> dict[tuple[str, str], tuple[Decimal, Decimal, int]]:
        sums: dict[tuple[str, str], tuple[Decimal, Decimal, int]] = {}
        if self.target is not None and self.lo < self.hi:
            for sku in self.charges:
                expected = sum(
                    (p.quantity for p in self._posts(sku, [(self.lo, self.hi)])), Decimal(0)
                )
                sums[(self.target.allocation, sku)] = (expected, Decimal(0), 0)
        for event in self.events:
            where = (event.allocation, event.parts.sku)
            expected, billed, count = sums.get(where, (Decimal(0), Decimal(0), 0))
            sums[where] = (expected, billed + event.quantity, count + 1)
        cpu = sorted(s for s, c in self.charges.items() if c.metric == "cpu")
        start = self.record.start_at
        for old in self.legacy if cpu and start is not None else []:
            assert start is not None
            if old.started_at is None or old.ended_at is None:
                continue
            a = int((old.started_at - start).total_seconds())
            b = int((old.ended_at - start).total_seconds())
            lo, hi = max(a, self.lo), min(b, self.hi)
            if b <= a or hi <= lo:
                continue
            share = (old.quantity * (hi - lo) / (b - a)).quantize(QUANTUM)
            where = (old.allocation, cpu[0])
            expected, billed, count = sums.get(where, (Decimal(0), Decimal(0), 0))
            sums[where] = (expected, billed + share, count + 1)
        return sums
