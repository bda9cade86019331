"""Applying corrections (see corrections.py) to the API's record, and showing them.

For one open correction: the run's events are read back from the API (our key format for
this run only, on the allocations the correction names and every mapped one), the fix is
planned (corrections.plan_fix), the stretches about to be deleted are stored in the
correction, the events beyond slurmdbd's seconds are deleted, their valid part is committed to
the outbox and delivered with the exactly-once protocol (pipeline.commit, delivery.deliver_outbox),
and only once every new event is on the API is the run's progress set down to slurmdbd's
seconds and the correction marked applied. Any step that fails leaves the correction open,
with the reason; the next attempt starts from what the API then holds, so nothing is lost and
nothing is billed twice whichever step stopped. The caller holds the state lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Optional, Union

from slurm_tracker import api, catalog_admin, ledger, pipeline, rating, report
from slurm_tracker.config import Config
from slurm_tracker.corrections import (
    Fix,
    metric_of,
    plan_fix,
    record_from_json,
    replacements,
    stretches_from_json,
    stretches_json,
)
from slurm_tracker.errors import ApiError, TemporaryFailure
from slurm_tracker.events import KEY_VERSION, rfc3339
from slurm_tracker.ledger import BilledEvent
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import JobRecord, Metric, PlannedEvent
from slurm_tracker.state import CorrectionRow, State

log = logging.getLogger(__name__)

#: Outbox statuses of events not (yet) settled on the API: a run with one is not corrected.
UNSETTLED = ("pending", "sending", "held", "dead")
DELETED_REASON = (
    "deleted on the API by a correction: slurmdbd now says the run used less "
    "(`slurm-tracker corrections list --all`)"
)
NOTHING_LOST = "nothing is lost: the next apply goes on from what the API holds"


@dataclass(frozen=True)
class Attempt:
    """What applying (or, dry, planning) one correction did or would do."""

    run: str
    job_id: str
    status: str  # applied | open (not done: see note) | planned (dry run)
    fix: Optional[Fix] = None
    posts: tuple[PlannedEvent, ...] = ()
    deleted: int = 0  # events the API says it deleted
    note: str = ""


def run_events(
    client: ledger.UsageLister,
    allocations: Iterable[str],
    run: str,
    cluster: str,
    required: Iterable[str] = (),
) -> tuple[list[BilledEvent], dict[tuple[str, str], Metric]]:
    """Our events of ``run`` (its key prefix) on ``allocations``, each once, and the metric
    each (allocation, SKU) was billed by (the events' metadata says). An allocation that cannot
    be read is skipped with a warning, unless it is ``required`` (the error is raised)."""
    found: dict[str, BilledEvent] = {}
    unnamed: list[BilledEvent] = []
    metrics: dict[tuple[str, str], Metric] = {}
    needed = set(required)
    for allocation in allocations:
        try:
            items = list(
                client.iter_usage(allocation, metadata=api.search_term(f"{KEY_VERSION}:{run}:"))
            )
        except ApiError as exc:
            if allocation in needed:
                raise
            log.warning("cannot read the events of allocation %r: %s", allocation, exc)
            continue
        for item in items:
            event = ledger.billed_event(item, allocation, cluster)
            if event is None or event.run != run:
                continue
            if event.cost_id:
                found[event.cost_id] = event
            else:
                unnamed.append(event)
            meta = item.get("metadata")
            metric = metric_of(meta.get("metric")) if isinstance(meta, dict) else None
            if metric is not None:
                metrics.setdefault((allocation, event.parts.sku), metric)
    return [*found.values(), *unnamed], metrics


def _cuts(
    catalog: Optional[rating.Catalog],
) -> Callable[[str, datetime, datetime], Sequence[datetime]]:
    def cuts(sku: str, begin_at: datetime, end_at: datetime) -> Sequence[datetime]:
        if catalog is None or sku not in catalog.skus:
            return ()
        return rating.boundaries(catalog, sku, begin_at, end_at)

    return cuts


def _prepare(
    row: CorrectionRow,
    config: Config,
    store: State,
    client: ledger.UsageLister,
    catalog: Optional[rating.Catalog],
) -> Union[tuple[Fix, list[PlannedEvent]], str]:
    """The fix of ``row`` and the events it posts, or why it cannot be applied now."""
    run = row.run
    for waiting in store.outbox(UNSETTLED):
        parts = ledger.parse_event_key(waiting.event_key)
        if parts is not None and parts.run == run:
            return (
                f"event {waiting.event_key} of the run is {waiting.status} in the outbox: it "
                "must be settled first (delivered by a sync, or released, retried or dropped: "
                "`slurm-tracker outbox list`)"
            )
    try:
        record = replace(record_from_json(row.record), elapsed_s=row.actual_s)
        removed = stretches_from_json(row.removed)
    except ValueError as exc:
        return f"the state file's copy of the correction cannot be read: {exc}"
    if record.start_at is None:
        return "the record has no start time"
    allocations = dict.fromkeys([*row.allocations, *catalog_admin.mapped_allocations(config)])
    events, metrics = run_events(client, allocations, run, record.cluster, row.allocations)
    fix = plan_fix(run, row.actual_s, events, removed)
    if any(not e.cost_id for e in fix.deletions):
        return "the API listed an event of the run without an id: it cannot be deleted"
    mapped = map_record(record, config.accounts, config.partitions)
    if isinstance(mapped, Target):
        for charge in mapped.charges:
            metrics.setdefault((mapped.allocation, charge.sku), charge.metric)
    agent = ledger.agent_id(store.path)
    posts: list[PlannedEvent] = []
    for stretch in fix.posts:
        if (stretch.allocation, stretch.sku) not in metrics:
            return (
                f"cannot tell which metric SKU {stretch.sku} on {stretch.allocation} bills "
                "(no event says, and the mapping does not give it for this run)"
            )
        planned = replacements(
            record,
            [stretch],
            metrics,
            metadata_fields=config.metadata_fields,
            agent=agent,
            cuts=_cuts(catalog),
        )
        if not planned:
            return (
                f"the record holds no {metrics[(stretch.allocation, stretch.sku)]} to bill "
                f"{stretch.from_s}-{stretch.to_s} s of SKU {stretch.sku} again"
            )
        posts += planned
    known = sorted(store.known_keys(p.event_key for p in posts))
    if known:
        return (
            f"event {known[0]} is already in the outbox but not on the API: revive it "
            "(`slurm-tracker outbox retry KEY`) or settle it first"
        )
    return fix, posts


def preview(
    row: CorrectionRow,
    config: Config,
    store: State,
    client: ledger.UsageLister,
    catalog: Optional[rating.Catalog] = None,
) -> Attempt:
    """What applying ``row`` would do now (reads the API, changes nothing)."""
    try:
        prepared = _prepare(row, config, store, client, catalog)
    except (ApiError, TemporaryFailure) as exc:
        prepared = f"the API's events of the run cannot be read: {exc}"
    if isinstance(prepared, str):
        return Attempt(row.run, row.job_id, "open", note=prepared)
    fix, posts = prepared
    return Attempt(row.run, row.job_id, "planned", fix, tuple(posts))


def apply_one(
    row: CorrectionRow,
    config: Config,
    store: State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog] = None,
    clock: Callable[[], datetime] = pipeline.utc_now,
) -> Attempt:
    """Apply the open correction ``row`` (see the module's description)."""
    run = row.run

    def still_open(note: str, fix: Optional[Fix] = None, deleted: int = 0) -> Attempt:
        store.correction_failed(run, note, clock())
        log.warning("correction of run %s (job %s) not applied: %s", run, row.job_id, note)
        return Attempt(run, row.job_id, "open", fix, deleted=deleted, note=note)

    try:
        prepared = _prepare(row, config, store, client, catalog)
    except (ApiError, TemporaryFailure) as exc:
        return still_open(f"the API's events of the run cannot be read: {exc}; {NOTHING_LOST}")
    if isinstance(prepared, str):
        return still_open(prepared)
    fix, posts = prepared
    deleted = 0
    if fix.deletions:
        store.correction_removing(run, stretches_json(fix.removed), clock())
        by_allocation: dict[str, list[BilledEvent]] = {}
        for event in fix.deletions:
            parts = ledger.parse_event_key(event.key)
            if parts is None or parts.run != run or not event.cost_id:
                raise AssertionError(f"refusing to delete {event.key!r}: not an event of {run}")
            log.info(
                "deleting event %s (id %s, %s %s) on allocation %s: slurmdbd now says %d s",
                event.key,
                event.cost_id,
                event.quantity,
                parts.sku,
                event.allocation,
                row.actual_s,
            )
            by_allocation.setdefault(event.allocation, []).append(event)
        for allocation, doomed in sorted(by_allocation.items()):
            try:
                deleted += client.delete_usage(allocation, [e.cost_id for e in doomed])
            except (ApiError, TemporaryFailure) as exc:
                note = f"deleting its events on {allocation} failed: {exc}; {NOTHING_LOST}"
                return still_open(note, fix, deleted)
            # their outbox rows: never sent again, not revived by `outbox retry --all`
            store.mark_deleted([e.key for e in doomed], DELETED_REASON, clock())
    if posts:
        pipeline.post_through_outbox(config, store, client, posts, clock)
        keys = {p.event_key for p in posts}
        waiting = [r for r in store.outbox(UNSETTLED) if r.event_key in keys]
        if waiting:
            listed = ", ".join(f"{r.event_key} ({r.status})" for r in waiting[:3])
            return still_open(
                f"{len(waiting)} posted event(s) not on the API yet: {listed}; the next sync "
                "delivers them (held ones once released), then the next apply completes the "
                "correction",
                fix,
                deleted,
            )
    store.correction_applied(run, clock())
    log.warning(
        "correction of run %s (job %s) applied: %d event(s) deleted, %d posted; the API now "
        "bills %d s of it",
        run,
        row.job_id,
        deleted,
        len(posts),
        row.actual_s,
    )
    return Attempt(run, row.job_id, "applied", fix, tuple(posts), deleted)


def apply_open(
    config: Config,
    store: State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog] = None,
    runs: Sequence[str] = (),
    clock: Callable[[], datetime] = pipeline.utc_now,
) -> list[Attempt]:
    """Apply every open correction (or those of ``runs``), oldest first."""
    wanted = set(runs)
    return [
        apply_one(row, config, store, client, catalog, clock)
        for row in store.corrections()
        if not wanted or row.run in wanted or row.job_id in wanted
    ]


def after_sync(
    config: Config,
    store: State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog],
    result: pipeline.SyncResult,
) -> pipeline.SyncResult:
    """With ``corrections.apply: true``: once a sync has delivered, apply the open
    corrections; the sync's outbox counts are read again (events posted by a correction and
    not delivered count as pending)."""
    if not config.corrections.apply or not store.correction_count():
        return result
    if result.outcome in ("auth", "unavailable"):
        log.warning("open corrections not applied this time: the API is not usable")
        return result
    apply_open(config, store, client, catalog)
    return replace(result, outbox=store.counts())


# ------------------------------------------------------------------------------ output


def row_json(row: CorrectionRow) -> dict[str, Any]:
    try:
        record: Optional[JobRecord] = record_from_json(row.record)
    except ValueError:
        record = None
    return {
        "run": row.run,
        "jobId": row.job_id,
        "status": row.status,
        "allocations": list(row.allocations),
        "skus": list(row.skus),
        "billedSeconds": row.billed_s,
        "slurmdbdSeconds": row.actual_s,
        "overBilledSeconds": max(0, row.billed_s - row.actual_s),
        "start": rfc3339(record.start_at) if record and record.start_at else None,
        "end": rfc3339(record.end_at) if record and record.end_at else None,
        "firstSeen": rfc3339(row.first_seen_at),
        "lastSeen": rfc3339(row.last_seen_at),
        "timesSeen": row.times_seen,
        "attempts": row.attempts,
        "resolvedAt": rfc3339(row.resolved_at) if row.resolved_at else None,
        "note": row.note,
    }


def list_text(rows: Sequence[CorrectionRow]) -> str:
    p = report.printable
    if not rows:
        return "no corrections"
    table = report.table(
        ["JOB", "STATUS", "ALLOCATION", "SKU", "BILLED S", "SLURMDBD S", "FIRST SEEN", "LAST SEEN"],
        [
            [
                p(r.job_id, 40),
                r.status,
                p(",".join(r.allocations), 40),
                p(",".join(r.skus), 40),
                str(r.billed_s),
                str(r.actual_s),
                rfc3339(r.first_seen_at),
                rfc3339(r.last_seen_at),
            ]
            for r in rows
        ],
        right=[4, 5],
    )
    notes = [f"  job {p(r.job_id, 40)} (run {p(r.run)}): {p(r.note)}" for r in rows if r.note]
    opened = sum(1 for r in rows if r.status == "open")
    tail = (
        f"{opened} open: `slurm-tracker corrections apply` shows what applying does, "
        "`--yes` does it"
        if opened
        else ""
    )
    return "\n".join([table, *notes, *([tail] if tail else [])])


def _attempt_json(attempt: Attempt) -> dict[str, Any]:
    fix = attempt.fix
    return {
        "run": attempt.run,
        "jobId": attempt.job_id,
        "status": attempt.status,
        "delete": [
            {
                "id": e.cost_id,
                "allocation": e.allocation,
                "eventKey": e.key,
                "quantity": report.number(e.quantity),
            }
            for e in (fix.deletions if fix else ())
        ],
        "post": [report.event_json(e) for e in attempt.posts],
        "deleted": attempt.deleted,
        "note": attempt.note,
    }


def attempts_json(attempts: Sequence[Attempt], done: bool) -> dict[str, Any]:
    return {
        "done": done,
        "applied": sum(1 for a in attempts if a.status == "applied"),
        "open": sum(1 for a in attempts if a.status == "open"),
        "corrections": [_attempt_json(a) for a in attempts],
    }


def attempts_text(attempts: Sequence[Attempt], done: bool) -> str:
    p = report.printable
    if not attempts:
        return "no open corrections"
    verb = ("deleted", "posted") if done else ("would delete", "would post")
    lines = []
    for a in attempts:
        head = {"applied": "applied", "open": "NOT applied", "planned": "plan"}[a.status]
        lines.append(f"job {p(a.job_id, 40)} (run {p(a.run)}): {head}")
        for d in a.fix.deletions if a.fix else ():
            lines.append(
                f"  {verb[0]} {p(d.key)} (id {p(d.cost_id, 60)}, {p(d.allocation, 40)}): "
                f"{d.quantity}"
            )
        for e in a.posts:
            lines.append(f"  {verb[1]} {p(e.event_key)} to {p(e.allocation, 40)}: {e.quantity}")
        if a.fix is not None and a.fix.nothing_to_do and a.status != "open":
            lines.append("  nothing to change on the API")
        if a.note:
            lines.append(f"  {p(a.note)}")
    if not done:
        lines.append("dry run: pass --yes to do it")
    return "\n".join(lines)
