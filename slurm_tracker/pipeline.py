"""Orchestration: one sync, one dry run, and the steps the backfill, reconcile and corrections
share (read -> compare the API's record -> plan -> commit -> deliver -> prune -> record).

The steps live in their own modules: reading sacct output (inputs.py), the window and the
clock (windows.py), planning (planning.py, plans.py), committing plans to the state
(committing.py), the exactly-once delivery (delivery.py), comparing the API's record and
posting repairs through the outbox (api_record.py), the catalog's administration
(catalog_admin.py). This module runs a sync and a dry run, and finishes a sync or backfill
(deliver, prune, record the outcome).

The clock is passed in: every function here that reads the time takes ``clock`` (the real one,
:func:`utc_now`, by default), so a test can pin it; ``now_at`` arguments are the time a sync
started.

Re-exported on purpose: the names below from inputs, windows, planning, plans, committing,
api_record, catalog_admin and delivery are still imported as ``pipeline.X`` by the CLI,
report.py, the backfill, reconcile, corrections, the benchmarks and the tests (see
``__all__``); new code should import them from where they live.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO, Optional

from slurm_tracker import api, ledger, rating, state
from slurm_tracker.api_record import compare_with_api, post_through_outbox
from slurm_tracker.catalog_admin import (
    catalog_warnings,
    check_online,
    load_catalog,
    mapped_allocations,
    mapped_skus,
    pull_catalog,
)
from slurm_tracker.committing import commit, commit_stream, without_events
from slurm_tracker.config import Config
from slurm_tracker.delivery import DeliveryReport, deliver_outbox
from slurm_tracker.inputs import (
    Input,
    Window,
    chunks,
    duplicate_records,
    file_zone,
    gather,
    open_input,
    parse_input,
    read_live,
    read_saved,
)
from slurm_tracker.planning import (
    BATCH_RECORDS,
    Planner,
    latest_records,
    plan_stream,
    plan_usage,
)
from slurm_tracker.plans import Plan, Total, Totals, merge_plans, reported_after, totals
from slurm_tracker.windows import Clock, billing_floor, check_mark, sync_window, utc_now

# this module's names, and those re-exported on purpose (see the docstring)
__all__ = [
    "ACKED_RETENTION_S",
    "BATCH_RECORDS",
    "Clock",
    "DeliveryReport",
    "DryRun",
    "Input",
    "Plan",
    "Planner",
    "SyncRequest",
    "SyncResult",
    "Total",
    "Totals",
    "Window",
    "add_deliveries",
    "billing_floor",
    "catalog_warnings",
    "check_mark",
    "check_online",
    "chunks",
    "commit",
    "commit_stream",
    "compare_with_api",
    "deliver_and_finish",
    "deliver_outbox",
    "dry_run",
    "duplicate_records",
    "file_zone",
    "gather",
    "latest_records",
    "load_catalog",
    "mapped_allocations",
    "mapped_skus",
    "merge_plans",
    "open_input",
    "parse_input",
    "plan_stream",
    "plan_usage",
    "post_through_outbox",
    "pull_catalog",
    "read_live",
    "read_saved",
    "reported_after",
    "sync_once",
    "sync_window",
    "totals",
    "utc_now",
    "without_events",
]

log = logging.getLogger(__name__)


#: acknowledged events are kept this long after the last comparison with the API's record (the
#: next one looks their keys up); counted when acknowledged, so `status` and the metrics keep
#: their totals (State.prune)
ACKED_RETENTION_S = 3600


@dataclass(frozen=True)
class SyncRequest:
    now_at: datetime
    sacct_file: Optional[str]
    fields: Optional[Sequence[str]]
    stdin: BinaryIO
    environ: Mapping[str, str]
    take_over: bool = False  # adopt another agent's events instead of stopping (WriterConflict)


@dataclass(frozen=True)
class SyncResult:
    plan: Plan
    window: Optional[Window]
    new_events: int
    delivery: DeliveryReport
    outbox: Mapping[str, int]  # counts per status after delivery

    @property
    def outcome(self) -> str:
        """ok, undelivered (exit 4: pending, held or dead events), unavailable (exit 75) or
        auth (exit 1)."""
        if self.delivery.auth_error:
            return "auth"
        if self.delivery.unavailable and self.delivery.acked == 0:
            return "unavailable"
        if any(self.outbox.get(status, 0) for status in ("pending", "sending", "held", "dead")):
            return "undelivered"
        return "ok"


@dataclass(frozen=True)
class DryRun:
    """What `sync --dry-run` shows: the plans of its input, batch by batch (consume them while
    the state is open), the window read (None for a saved file) and the input's name."""

    plans: Iterator[Plan]
    window: Optional[Window]
    source: str


def dry_run(
    config: Config,
    store: state.State,
    catalog: Optional[rating.Catalog],
    *,
    now_at: datetime,
    sacct_file: Optional[str],
    fields: Optional[Sequence[str]],
    stdin: BinaryIO,
    environ: Mapping[str, str],
    agent: str,
    clock: Clock = utc_now,
) -> DryRun:
    """Plan what a sync would, from the state as it is (opened read-only), changing nothing.

    The input flows through parse -> plan -> output in batches (plan_stream): memory stays
    bounded whatever its size."""
    floor_at = billing_floor(store, config)
    window = sync_window(now_at, check_mark(store, config, clock=clock), config.sacct, floor_at)
    stream, read_window = open_input(config, window, sacct_file, fields, stdin, environ)
    if read_window is not None and store.floor_at() is None:
        floor_at = max(window.start_at, floor_at or window.start_at)  # as the sync would
    planner = Planner(
        config,
        catalog,
        now_at=clock(),
        floor_at=floor_at,
        forgotten_before=store.pruned_before(),
        agent=agent,
    )
    return DryRun(plan_stream(stream, planner, store.reported), read_window, stream.source)


def sync_once(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog],
    request: SyncRequest,
    *,
    clock: Clock = utc_now,
) -> SyncResult:
    """One regular sync: read, compare the API's record, plan, commit, deliver, prune.

    The caller holds the lock. Before anything is planned, the API's events of the cluster are
    compared with the state file (ledger.check): events it does not know are counted as billed,
    and another agent's events stop the sync (WriterConflict) unless ``take_over``.

    The input is planned and committed in batches (plan_stream, commit_stream): the outbox and
    progress of each batch in one transaction, the high-water mark with the last one only.
    """
    floor_at = billing_floor(store, config)
    window = sync_window(
        request.now_at, check_mark(store, config, clock=clock), config.sacct, floor_at
    )
    stream, read_window = open_input(
        config, window, request.sacct_file, request.fields, request.stdin, request.environ
    )
    agent = ledger.agent_id(store.path)
    compare_with_api(
        config,
        store,
        client,
        window.start_at - timedelta(seconds=ledger.LEARN_BEFORE_S),
        take_over=request.take_over,
        clock=clock,
    )
    if read_window is not None and store.floor_at() is None:
        store.set_floor(window.start_at)  # the first live sync: nothing before it is billed
        floor_at = billing_floor(store, config)
    planner = Planner(
        config,
        catalog,
        now_at=clock(),
        floor_at=floor_at,
        forgotten_before=store.pruned_before(),
        agent=agent,
    )
    high_water_at = read_window.end_at if read_window else None
    plans = plan_stream(stream, planner, store.reported)
    plan, new = commit_stream(store, plans, request.now_at, high_water_at, clock=clock)
    return deliver_and_finish(
        config, store, client, plan, read_window, new, request.now_at, clock=clock
    )


def add_deliveries(before: DeliveryReport, after: DeliveryReport) -> DeliveryReport:
    """Two delivery passes as one: counts added, the later pass's backlog and messages (the
    earlier one's when the later has none)."""
    return DeliveryReport(
        acked=before.acked + after.acked,
        found_by_lookup=before.found_by_lookup + after.found_by_lookup,
        dead=before.dead + after.dead,
        pending=after.pending,
        unavailable=after.unavailable or before.unavailable,
        auth_error=after.auth_error or before.auth_error,
    )


def deliver_and_finish(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    plan: Plan,
    window: Optional[Window],
    new: int,
    started_at: datetime,
    *,
    kind: str = "sync",
    delivered_before: Optional[DeliveryReport] = None,
    clock: Clock = utc_now,
) -> SyncResult:
    """Deliver what waits, prune, and record the outcome of a sync (or ``kind``: backfill,
    whose chunks were delivered as it went: ``delivered_before``)."""
    delivery = deliver_outbox(store, client, clock, config.api.concurrency)
    if delivered_before is not None:
        delivery = add_deliveries(delivered_before, delivery)
    store.prune(clock(), config.sacct.overlap_s, ACKED_RETENTION_S)
    result = SyncResult(plan, window, new, delivery, store.counts())
    store.record_sync(
        started_at,
        clock(),
        result.outcome,
        {
            **({"kind": kind} if kind != "sync" else {}),
            "planned": new,
            "posted": delivery.acked,
            "pending": result.outbox.get("pending", 0),
            "dead": result.outbox.get("dead", 0),
            "skipped": len(plan.skipped),
            "rejected": len(plan.rejected),
            "records": plan.records,
            "held": result.outbox.get("held", 0),
            **_failure_reason(result),
        },
    )
    return result


def _failure_reason(result: SyncResult) -> dict[str, str]:
    """The one-line reason of an unavailable or auth outcome, for the syncs table."""
    reason = result.delivery.auth_error or (
        result.delivery.unavailable if result.outcome == "unavailable" else ""
    )
    return {"reason": " ".join(str(reason).split())[:300]} if reason else {}
