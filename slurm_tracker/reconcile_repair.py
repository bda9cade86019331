"""The repair of a reconcile: :func:`plan_repair` (pure) chooses, per run, what to delete and
what to post; :func:`apply_repair` does it (deletes on the API, then posts through the outbox,
exactly once)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from slurm_tracker import api, ledger, pipeline
from slurm_tracker.config import Config
from slurm_tracker.delivery import DeliveryReport
from slurm_tracker.models import PlannedEvent
from slurm_tracker.reconcile_model import Deletion, Fix, Report
from slurm_tracker.state import State

log = logging.getLogger("slurm_tracker.reconcile")  # the name its logs have always carried

#: Outbox statuses of events not yet on the API, or not settled: their runs are not repaired.
UNSETTLED = ("pending", "sending", "held", "dead")
DELETED_REASON = (
    "deleted on the API by `slurm-tracker reconcile --repair`: it duplicated or overlapped "
    "an event kept for the same run and SKU"
)


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
