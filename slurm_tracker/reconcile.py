"""Reconcile: what slurmdbd says was used against what the Allocations API holds as billed.

``reconcile`` is pure: given the runs sacct returned for a window (one record per run), the
events the API holds for this cluster (ledger.BilledEvent) and the config, it judges every
run and SKU the way the billing path would bill it now (mapping, billing floor, hold-back of
running runs, month and rate cuts, quantities) and reports:

- ``missing``: elapsed seconds no event covers (final runs: up to ElapsedRaw; running runs:
  gaps below the furthest second billed for the run, the rest is the next sync's business);
- ``duplicate``: one event key accepted more than once;
- ``overlap``: different keys covering the same elapsed seconds of one run and SKU (what a
  lost or second state file produces);
- ``over-billed``: an event billing seconds beyond the run's ElapsedRaw as slurmdbd now says;
- ``unknown-run``: events of a run sacct did not return, whose stretch lies inside the window
  (events at its edges belong to runs outside it: not judged);
- ``misrouted``: an event on an allocation or SKU the current mapping does not give the run;
- ``other-agent``: an event another agent (metadata ``agent``) posted: listed, not counted as a
  discrepancy (its double billing, if any, shows as a duplicate or an overlap).

The repair (``plan_repair``, pure; ``apply_repair`` does it) keeps, per run and SKU, events
greedily (earliest ``createdAt`` first, then key) that do not overlap a kept one, deletes the
rest, and posts what is then missing with proper keys through the outbox. For runs it cannot
re-post (sacct did not return them, or the mapping gives them nothing) it deletes only extra
copies of one key. Over-billing, misrouted and unknown-run events are reported, never touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, BinaryIO, Optional

from slurm_tracker import api, catalog_admin, inputs, ledger, pipeline, planning, rating, report
from slurm_tracker.config import Config
from slurm_tracker.delivery import DeliveryReport
from slurm_tracker.events import QUANTUM, plan, rfc3339
from slurm_tracker.ledger import BilledEvent, LegacyEvent
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import JobRecord, PlannedEvent
from slurm_tracker.plausibility import implausible
from slurm_tracker.segments import SegmentPolicy, split
from slurm_tracker.state import State

log = logging.getLogger(__name__)

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
#: Outbox statuses of events not yet on the API, or not settled: their runs are not repaired.
UNSETTLED = ("pending", "sending", "held", "dead")
DELETED_REASON = (
    "deleted on the API by `slurm-tracker reconcile --repair`: it duplicated or overlapped "
    "an event kept for the same run and SKU"
)
_NEVER = datetime.max.replace(tzinfo=timezone.utc)


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


# ------------------------------------------------------------------------------ the pure part


def reconcile(
    records: Iterable[JobRecord],
    billed: Iterable[BilledEvent],
    config: Config,
    *,
    agent: str,
    now_at: datetime,
    window: inputs.Window,
    floor_at: Optional[datetime] = None,
    catalog: Optional[rating.Catalog] = None,
    legacy: Iterable[LegacyEvent] = (),
) -> Report:
    """Compare ``records`` (sacct, for ``window``) with ``billed`` (the API); no I/O.

    ``agent``: our identity (ledger.agent_id); ``now_at``: the real clock, for the
    plausibility checks the billing path makes; ``floor_at``: the billing floor
    (pipeline.billing_floor): no usage before it is expected; ``catalog``: rate-rule changes
    cut the stretches to post, as a sync cuts them; ``legacy``: the older Go agent's events
    (ledger.legacy_events), counted as billing the core-hours of the runs they belong to.
    """
    clusters = set(config.sacct.clusters or (config.cluster,))
    latest, _ = planning.latest_records(records)
    runs = {r.run.text: r for r in latest if r.cluster in clusters}
    old_by_run = _legacy_by_run(runs.values(), legacy)
    ours = list({e.cost_id or id(e): e for e in billed if e.parts.cluster in clusters}.values())
    by_run: dict[str, list[BilledEvent]] = {}
    for event in ours:
        by_run.setdefault(event.run, []).append(event)
    policy = SegmentPolicy(config.reporting_interval_s, config.sacct.lag_s)
    findings: list[Finding] = []
    fixes: list[Fix] = []
    totals: dict[tuple[str, str], list[Any]] = {}
    not_judged: list[tuple[str, str]] = []
    judged = 0
    for text, record in sorted(runs.items()):
        events = by_run.pop(text, [])
        why = _not_judged(record, config, now_at)
        if why:
            not_judged.append((record.job_id, why))
            findings += _duplicates(events, record.job_id)
            fixes += _dedupe_only(text, events)
            continue
        judged += 1
        judge = _Judge(record, events, config, policy, floor_at, catalog, agent)
        judge.add_legacy(old_by_run.get(text, []))
        findings += judge.findings()
        fixes += judge.fixes()
        for (allocation, sku), (expected, billed_q, count) in judge.totals().items():
            row = totals.setdefault((allocation, sku), [Decimal(0), Decimal(0), 0])
            row[0] += expected
            row[1] += billed_q
            row[2] += count
    for text, events in sorted(by_run.items()):  # runs sacct did not return
        inside = [e for e in events if _inside(e, window)]
        findings += [
            _finding("unknown-run", e, "", f"run {text} is not in slurmdbd's answer for the window")
            for e in sorted(inside, key=_order)
        ]
        findings += _duplicates(events, "")
        fixes += _dedupe_only(text, events)
    findings += [
        _finding("other-agent", e, "", f"posted by agent {e.agent!r} (this one is {agent!r})")
        for e in sorted(ours, key=_order)
        if e.agent and e.agent != agent
    ]
    return Report(
        window=window,
        agent=agent,
        runs=judged,
        events=len(ours),
        findings=tuple(findings),
        totals=tuple(Total(a, s, r[0], r[1], r[2]) for (a, s), r in sorted(totals.items())),
        fixes=tuple(f for f in fixes if f.deletions or f.posts),
        not_judged=tuple(not_judged),
        old_agent=sum(len(v) for v in old_by_run.values()),
    )


def _legacy_by_run(
    runs: Iterable[JobRecord], legacy: Iterable[LegacyEvent]
) -> dict[str, list[LegacyEvent]]:
    """The Go agent's events by the run they billed: the run of their cluster and JobIDRaw
    that had started by their ``endedAt`` and not ended before it (the agent dated its events
    ``Start + elapsed``, or End), and if several did (a requeued job), the one that had started
    by their ``startedAt``. An event no run or several runs fit is left out."""
    by_job: dict[tuple[str, str], list[JobRecord]] = {}
    for record in runs:
        by_job.setdefault((record.cluster, record.job_id_raw), []).append(record)
    slack = timedelta(seconds=1)
    found: dict[str, list[LegacyEvent]] = {}
    for event in legacy:
        begin, end = event.started_at, event.ended_at
        if begin is None or end is None:
            continue
        fits = [
            r
            for r in by_job.get((event.cluster, event.job_id_raw), [])
            if r.start_at is not None
            and r.start_at <= end + slack
            and (r.end_at is None or end <= r.end_at + slack)
        ]
        if len(fits) > 1:  # a requeued job's runs: the one the whole stretch lies in
            fits = [r for r in fits if r.start_at is not None and r.start_at <= begin + slack]
        if len(fits) == 1:
            found.setdefault(fits[0].run.text, []).append(event)
    return found


def _not_judged(record: JobRecord, config: Config, now_at: datetime) -> str:
    """Why the billing path would not judge ``record`` now (it bills nothing of it yet)."""
    if not record.account or not record.partition:
        return "slurmdbd has not completed the record (no account or partition)"
    problem = implausible(record, now_at, config.limits)
    return f"implausible, quarantined by syncs: {problem}" if problem else ""


def _inside(event: BilledEvent, window: inputs.Window) -> bool:
    start, end = event.started_at, event.ended_at
    return bool(start and end and window.start_at <= start and end <= window.end_at)


def _order(event: BilledEvent) -> tuple[bool, datetime, str, str]:
    """Greedy order: earliest createdAt first (unknown last), then key, then id."""
    created = event.created_at
    return (created is None, created or _NEVER, event.key, event.cost_id)


def _finding(kind: str, event: BilledEvent, job_id: str, detail: str) -> Finding:
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


def _duplicates(events: Sequence[BilledEvent], job_id: str) -> list[Finding]:
    by_key: dict[str, list[BilledEvent]] = {}
    for event in sorted(events, key=_order):
        by_key.setdefault(event.key, []).append(event)
    return [
        replace(
            _finding("duplicate", copies[0], job_id, f"accepted {len(copies)} times"),
            quantity=sum((e.quantity for e in copies[1:]), Decimal(0)),
        )
        for key, copies in sorted(by_key.items())
        if len(copies) > 1
    ]


def _greedy(
    events: Sequence[BilledEvent], overlaps_too: bool
) -> tuple[list[BilledEvent], list[Deletion]]:
    """Keep events in _order that neither repeat a kept key nor (``overlaps_too``) overlap a
    kept stretch; the rest are to delete, each with the kept event that proves it."""
    kept: list[BilledEvent] = []
    deletions: list[Deletion] = []
    for event in sorted(events, key=_order):
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


def _dedupe_only(run: str, events: Sequence[BilledEvent]) -> list[Fix]:
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


class _Judge:
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
            for event in sorted(group, key=_order):
                hit = _first_common(event, old)
                if hit is not None:
                    out.append(self._over_old(event, hit))
        out += _duplicates(self.events, job)
        for sku in sorted({e.parts.sku for e in self.events}):
            firsts: dict[str, BilledEvent] = {}  # one copy per key: copies are duplicates
            for event in sorted(self.events, key=_order):
                if event.parts.sku == sku:
                    firsts.setdefault(event.key, event)
            group = list(firsts.values())
            for i, first in enumerate(group):
                for second in group[i + 1 :]:
                    common = _common(first, second)
                    if common is not None:
                        out.append(self._overlap(first, second, common))
        for event in sorted(self.events, key=_order):
            parts = event.parts
            if parts.to_s > record.elapsed_s:
                over_from = max(parts.from_s, record.elapsed_s)
                share = Decimal(parts.to_s - over_from) / Decimal(parts.to_s - parts.from_s)
                out.append(
                    replace(
                        _finding(
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
                out.append(_finding("misrouted", event, job, why))
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
            _finding(
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
                fixes += _dedupe_only(self.record.run.text, group)
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


# ------------------------------------------------------------------------------ the repair


@dataclass(frozen=True)
class Repair:
    """What ``--repair`` does: delete, then post (through the outbox)."""

    deletions: tuple[Deletion, ...]
    posts: tuple[PlannedEvent, ...]
    dropped_keys: frozenset[str]  # keys of which no copy stays on the API
    skipped: tuple[str, ...]  # runs left alone, and why


def plan_repair(report: Report, outbox: Mapping[str, str]) -> Repair:
    """The repair of ``report``'s fixes, given the state's outbox (event key -> status).

    A run with events not yet settled in the outbox (pending, sending, held or dead) is left
    alone: they may reach the API later and would overlap what the repair posts. So is a run
    whose new key is already in the outbox (a sync would never send it again), and one with an
    event the API listed without an id (it cannot be deleted).
    """
    unsettled: dict[str, str] = {}
    for key, status in outbox.items():
        parts = ledger.parse_event_key(key)
        if parts is not None and status in UNSETTLED:
            unsettled.setdefault(parts.run, f"event {key} is {status} in the outbox")
    by_run: dict[str, list[Fix]] = {}
    for fix in report.fixes:
        by_run.setdefault(fix.run, []).append(fix)
    deletions: list[Deletion] = []
    posts: list[PlannedEvent] = []
    kept: set[str] = set()
    skipped: list[str] = []
    for run, fixes in sorted(by_run.items()):
        why = unsettled.get(run, "")
        for fix in fixes:
            known = [p.event_key for p in fix.posts if p.event_key in outbox]
            if known and not why:
                why = f"event {known[0]} is already in the outbox ({outbox[known[0]]})"
            if any(not d.event.cost_id for d in fix.deletions) and not why:
                why = "the API listed one of its events without an id"
        if why:
            skipped.append(f"run {run} not repaired: {why}; deal with it first (outbox list)")
            continue
        for fix in fixes:
            deletions += fix.deletions
            posts += fix.posts
            kept |= fix.kept_keys
    dropped = frozenset(d.event.key for d in deletions) - kept
    return Repair(tuple(deletions), tuple(posts), dropped, tuple(skipped))


@dataclass(frozen=True)
class Applied:
    deleted: int  # events the API says it deleted
    new: int  # events added to the outbox
    delivery: DeliveryReport
    undelivered: tuple[str, ...]  # keys of repair events not (yet) on the API, with status


def apply_repair(
    repair: Repair,
    config: Config,
    store: State,
    client: api.AllocationsClient,
    now_at: datetime,
    clock: Callable[[], datetime] = pipeline.utc_now,
) -> Applied:
    """Delete, mark the deleted events' outbox rows, then post through the outbox (committed
    first, then delivered with the exactly-once protocol). The caller holds the state lock.

    Only events carrying our key format for one of our clusters, with an id, are deleted."""
    clusters = set(config.sacct.clusters or (config.cluster,))
    by_allocation: dict[str, list[str]] = {}
    for deletion in repair.deletions:
        event = deletion.event
        parts = ledger.parse_event_key(event.key)
        if parts is None or parts.cluster not in clusters or not event.cost_id:
            raise AssertionError(f"refusing to delete {event.key!r}: not one of our events")
        log.info(
            "deleting event %s (id %s) on allocation %s: %s",
            event.key,
            event.cost_id,
            event.allocation,
            deletion.reason,
        )
        by_allocation.setdefault(event.allocation, []).append(event.cost_id)
    deleted = sum(client.delete_usage(a, ids) for a, ids in sorted(by_allocation.items()))
    if repair.dropped_keys:
        store.mark_deleted(sorted(repair.dropped_keys), DELETED_REASON, now_at)
    new, delivery = pipeline.post_through_outbox(config, store, client, repair.posts, clock)
    keys = {e.event_key for e in repair.posts}
    undelivered = tuple(
        f"{row.event_key} ({row.status})"
        for row in store.outbox(UNSETTLED)
        if row.event_key in keys
    )
    return Applied(deleted, new, delivery, undelivered)


# ------------------------------------------------------------------------------ reading


def read_records(
    config: Config,
    window: inputs.Window,
    *,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[JobRecord], int]:
    """The runs slurmdbd returns for ``window`` (one record each) and how many records were
    rejected: live, one sacct call per chunk (sacct.backfill_chunk) with a pause between
    chunks, as backfill reads; or a saved capture, of which only runs overlapping the window
    are kept."""
    latest: list[JobRecord] = []
    rejected = 0
    if sacct_file is not None:
        given = inputs.gather(config, window, sacct_file, stdin, environ)
        parsed = inputs.parse_input(config, given, None)
        latest, rejected = list(parsed.records), len(parsed.rejected)
    else:
        chunks = inputs.chunks(window.start_at, window.end_at, config.sacct.backfill_chunk_s)
        for number, chunk in enumerate(chunks):
            if number:
                sleep(config.sacct.backfill_pause_s)
            log.info("reconcile chunk %d/%d", number + 1, len(chunks))
            parsed = inputs.parse_input(config, inputs.read_live(config, chunk, environ), None)
            latest, _ = planning.latest_records([*latest, *parsed.records])
            rejected += len(parsed.rejected)
    latest, _ = planning.latest_records(latest)
    return [r for r in latest if _overlaps(r, window)], rejected


def _overlaps(record: JobRecord, window: inputs.Window) -> bool:
    """Whether sacct -S -E would return the run for the window (it ran inside it)."""
    start, end = record.start_at, record.end_at
    return start is not None and start < window.end_at and (end is None or end >= window.start_at)


def read_since(records: Sequence[JobRecord], window: inputs.Window) -> datetime:
    """From when the API's events are read (by endedAt): every event of a run ends after the
    run's start, so the earliest start of the runs judged (or the window's start) is enough."""
    starts = [r.start_at for r in records if r.start_at is not None]
    return min([window.start_at, *starts])


def read_billed(client: ledger.UsageLister, config: Config, since: datetime) -> list[BilledEvent]:
    """Our events of our clusters on the mapped allocations that ended at ``since`` or later
    (each once, even when paging showed an item twice)."""
    allocations = catalog_admin.mapped_allocations(config)
    found: dict[str, BilledEvent] = {}
    unnamed: list[BilledEvent] = []
    for cluster in config.sacct.clusters or (config.cluster,):
        for event in ledger.billed_events(client, allocations, cluster, ended_from=since):
            if event.cost_id:
                found[event.cost_id] = event
            else:
                unnamed.append(event)
    return [*found.values(), *unnamed]


def examine(
    config: Config,
    store: State,
    client: ledger.UsageLister,
    records: Sequence[JobRecord],
    window: inputs.Window,
    catalog: Optional[rating.Catalog] = None,
) -> Report:
    """Read the API's events for ``records`` and judge them (our agent: the state file's).

    A state file that took over from the older Go agent (``migrate state``) also reads that
    agent's events, which cover the core-hours it billed before the cutover."""
    since = read_since(records, window)
    billed = read_billed(client, config, since)
    legacy: list[LegacyEvent] = []
    if store.migration() is not None:
        legacy = ledger.legacy_events(
            client,
            catalog_admin.mapped_allocations(config),
            config.sacct.clusters or (config.cluster,),
            ended_from=since,
        )
    return reconcile(
        records,
        billed,
        config,
        agent=ledger.agent_id(store.path),
        now_at=pipeline.utc_now(),
        window=window,
        floor_at=pipeline.billing_floor(store, config),
        catalog=catalog,
        legacy=legacy,
    )


def outbox_status(store: State) -> dict[str, str]:
    """Every event key of the state's outbox, with its status (acknowledged events are kept
    about an hour: State.prune)."""
    return store.outbox_statuses()


# ------------------------------------------------------------------------------ output


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "run": finding.run,
        "jobId": finding.job_id,
        "allocation": finding.allocation,
        "sku": finding.sku,
        "elapsedFrom": finding.from_s,
        "elapsedTo": finding.to_s,
        "quantity": report.number(finding.quantity),
        "keys": list(finding.keys),
        "detail": finding.detail,
    }


def _deletion_json(deletion: Deletion) -> dict[str, Any]:
    event = deletion.event
    return {
        "id": event.cost_id,
        "allocation": event.allocation,
        "eventKey": event.key,
        "quantity": report.number(event.quantity),
        "reason": deletion.reason,
    }


def as_json(
    result: Report,
    repair: Optional[Repair] = None,
    applied: Optional[Applied] = None,
    after: Optional[Report] = None,
) -> dict[str, Any]:
    """The document of ``reconcile --output json`` (``after``: the API read again after the
    repair)."""
    counts = {kind: sum(1 for f in result.findings if f.kind == kind) for kind in KINDS}
    doc: dict[str, Any] = {
        "window": {"start": rfc3339(result.window.start_at), "end": rfc3339(result.window.end_at)},
        "agent": result.agent,
        "runs": result.runs,
        "events": result.events,
        "oldAgentEvents": result.old_agent,
        "discrepancies": result.discrepancies,
        "counts": counts,
        "findings": [_finding_json(f) for f in result.findings],
        "notJudged": [{"jobId": j, "reason": r} for j, r in result.not_judged],
        "totals": [
            {
                "allocation": t.allocation,
                "sku": t.sku,
                "expected": report.number(t.expected),
                "billed": report.number(t.billed),
                "events": t.events,
            }
            for t in result.totals
        ],
    }
    if repair is not None:
        doc["repair"] = {
            "done": applied is not None,
            "delete": [_deletion_json(d) for d in repair.deletions],
            "post": [report.event_json(e) for e in repair.posts],
            "skipped": list(repair.skipped),
        }
        if applied is not None:
            doc["repair"]["deleted"] = applied.deleted
            doc["repair"]["posted"] = applied.delivery.acked
            doc["repair"]["undelivered"] = list(applied.undelivered)
    if after is not None:
        doc["after"] = as_json(after)
    return doc


def as_text(
    result: Report,
    repair: Optional[Repair] = None,
    applied: Optional[Applied] = None,
    after: Optional[Report] = None,
) -> str:
    """The table of ``reconcile``: findings, totals, the repair, what the API holds after it."""
    p = report.printable
    window = result.window
    lines = [
        f"reconcile {rfc3339(window.start_at)} .. {rfc3339(window.end_at)}: {result.runs} runs "
        f"judged, {result.events} events of this cluster read (this agent: {p(result.agent)})"
        + (
            f"; {result.old_agent} events of the old Go agent counted as billing"
            if result.old_agent
            else ""
        )
    ]
    if result.findings:
        lines += ["", _findings_table(result.findings)]
    lines += [f"not judged: job {p(j, 40)}: {p(why)}" for j, why in result.not_judged]
    if result.totals:
        rows = [
            [
                p(t.allocation, 40),
                p(t.sku, 40),
                f"{t.expected:.6f}",
                f"{t.billed:.6f}",
                f"{t.billed - t.expected:+.6f}",
                str(t.events),
            ]
            for t in result.totals
        ]
        headers = ["ALLOCATION", "SKU", "EXPECTED", "BILLED", "DIFFERENCE", "EVENTS"]
        lines += ["", report.table(headers, rows, right=[2, 3, 4, 5])]
    lines += ["", _summary(result)]
    if repair is not None:
        lines += ["", _repair_text(repair, applied)]
    if after is not None:
        lines += ["", f"after the repair, the API holds: {_summary(after)}"]
        if after.findings:
            lines.append(_findings_table(after.findings))
    return "\n".join(lines)


def _summary(result: Report) -> str:
    found = result.discrepancies
    notices = len(result.findings) - found
    others = f", {notices} event{'s' if notices != 1 else ''} of other agents" if notices else ""
    return f"{found} discrepanc{'y' if found == 1 else 'ies'}{others}"


def _findings_table(findings: Sequence[Finding]) -> str:
    p = report.printable
    rows = [
        [
            f.kind,
            p(f.job_id, 40),
            p(f.allocation, 40),
            p(f.sku, 40),
            f"{f.from_s}-{f.to_s}",
            f"{f.quantity:.6f}",
            p(f"{f.detail}: {', '.join(f.keys)}", 400),
        ]
        for f in findings
    ]
    headers = ["KIND", "JOB", "ALLOCATION", "SKU", "ELAPSED S", "QUANTITY", "DETAIL"]
    return report.table(headers, rows, right=[5])


def _repair_text(repair: Repair, applied: Optional[Applied]) -> str:
    p = report.printable
    verb = ("deleted", "posted") if applied else ("would delete", "would post")
    lines = [f"repair{'' if applied else ' (dry: pass --yes to do it)'}:"]
    for d in repair.deletions:
        lines.append(
            f"  {verb[0]} {p(d.event.key)} (id {p(d.event.cost_id, 60)}, "
            f"{p(d.event.allocation, 40)}): {p(d.reason)}"
        )
    for e in repair.posts:
        lines.append(f"  {verb[1]} {p(e.event_key)} to {p(e.allocation, 40)}: {e.quantity}")
    lines += [f"  {p(s)}" for s in repair.skipped]
    if not (repair.deletions or repair.posts or repair.skipped):
        lines.append("  nothing to do")
    if applied is not None:
        lines.append(
            f"  the API deleted {applied.deleted} of {len(repair.deletions)} events; "
            f"{applied.delivery.acked} events delivered"
        )
        lines += [f"  not delivered yet: {p(u)}" for u in applied.undelivered]
    return "\n".join(lines)
