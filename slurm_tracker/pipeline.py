"""Orchestration: one sync, one dry run, and the steps the backfill, reconcile and corrections
share (read -> compare the API's record -> plan -> commit -> deliver -> prune -> record).

The steps live in their own modules: reading sacct output (inputs.py), planning
(planning.py, plans.py), the exactly-once delivery (delivery.py), the catalog's administration
(catalog_admin.py). This module picks the window, commits plans to the state and runs a sync.

The clock is passed in: every function here that reads the time takes ``clock`` (the real one,
:func:`utc_now`, by default), so a test can pin it; ``now_at`` arguments are the time a sync
started.

Re-exported on purpose: the names below from inputs, planning, plans, catalog_admin and
delivery are still imported as ``pipeline.X`` by the CLI, report.py, costs/reading.py, the
benchmarks and the tests (see ``__all__``); new code should import them from where they live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import BinaryIO, Optional

from slurm_tracker import api, ledger, rating, state
from slurm_tracker.catalog_admin import (
    catalog_warnings,
    check_online,
    load_catalog,
    mapped_allocations,
    mapped_skus,
    pull_catalog,
)
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.delivery import DeliveryReport, deliver_outbox
from slurm_tracker.errors import StateError
from slurm_tracker.events import request_body
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
from slurm_tracker.models import PlannedEvent, RunKey
from slurm_tracker.planning import (
    BATCH_RECORDS,
    Planner,
    latest_records,
    plan_stream,
    plan_usage,
)
from slurm_tracker.plans import Plan, Total, Totals, merge_plans, reported_after, totals

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
]

log = logging.getLogger(__name__)

#: A clock: returns the current time, aware, in UTC.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def sync_window(
    now_at: datetime,
    high_water_at: Optional[datetime],
    cfg: SacctConfig,
    floor_at: Optional[datetime] = None,
) -> Window:
    """From the high-water mark minus the overlap (or the first-sync start) to now minus the lag,
    never starting before the billing floor."""
    end_at = now_at - timedelta(seconds=cfg.lag_s)
    if high_water_at is not None:
        start_at = high_water_at - timedelta(seconds=cfg.overlap_s)
    elif cfg.first_sync_start is not None:
        start_at = cfg.first_sync_start
    else:
        start_at = end_at - timedelta(seconds=cfg.first_sync_lookback_s)
    if floor_at is not None:
        start_at = max(start_at, floor_at)
    return Window(start_at, max(start_at, end_at))


def billing_floor(store: state.State, config: Config) -> Optional[datetime]:
    """No usage before this is billed by a sync: the later of the first sync's window start
    (stored by that sync) and an absolute sacct.first_sync_start."""
    floors = [at for at in (store.floor_at(), config.sacct.first_sync_start) if at is not None]
    return max(floors) if floors else None


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


def commit(
    store: state.State,
    plan: Plan,
    now_at: datetime,
    high_water_at: Optional[datetime],
    *,
    clock: Clock = utc_now,
) -> int:
    """Store a plan in ONE transaction: outbox (held events held), progress, the high-water
    mark (never past the real clock), the quarantine of rejected records, the resolution of
    entries whose run now reads sane, and the corrections found."""
    if high_water_at is not None:
        high_water_at = min(high_water_at, clock())
    pruned_before = store.pruned_before()
    return store.commit_plan(
        plan.events,
        [request_body(e) for e in plan.events],
        now_at,
        high_water_at,
        held=plan.held,
        quarantine=[
            state.QuarantineEntry(
                key=r.key,
                job_id=r.job_id,
                reason=r.reason,
                text=r.text,
                remember_run=_never_billed(r.run, pruned_before),
            )
            for r in plan.rejected
        ],
        resolved=plan.checked_runs,
        corrections=[c.stored() for c in plan.corrections],
        final_seen=dict(plan.final_seen),
    )


def _never_billed(run: Optional[RunKey], pruned_before: Optional[datetime]) -> str:
    """``run``'s text when the lack of a progress row proves it was never billed (it was
    submitted after the pruning horizon, so no billing of it can have been pruned), else ""."""
    if run is None or (pruned_before is not None and run.submit_at < pruned_before):
        return ""
    return run.text


def check_mark(store: state.State, config: Config, *, clock: Clock = utc_now) -> Optional[datetime]:
    """The high-water mark; StateError when it is in the future of the real clock."""
    mark = store.high_water_at()
    now_at = clock()
    if mark is not None and mark > now_at + timedelta(seconds=config.limits.clock_skew_s):
        raise StateError(
            f"the high-water mark of {store.path} is {mark:%Y-%m-%dT%H:%M:%SZ}, in the future "
            f"(now {now_at:%Y-%m-%dT%H:%M:%SZ}): every sync would read an empty window and bill "
            "nothing. Check the clock, then set the mark back to the last good sync, e.g. "
            f"`slurm-tracker state set-mark {now_at - timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}` "
            "(usage already billed is not billed again)"
        )
    return mark


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


def commit_stream(
    store: state.State,
    plans: Iterable[Plan],
    now_at: datetime,
    high_water_at: Optional[datetime],
    *,
    clock: Clock = utc_now,
) -> tuple[Plan, int]:
    """Commit the plans of an input's batches (plan_stream), each in ONE transaction (see
    commit), the high-water mark only with the last; returns the plans as one, without their
    events (they are in the outbox), and how many events were new to the outbox.

    Exactly once holds batch by batch: a batch's events and its runs' progress are committed
    together, and a run is in one batch only (duplicate records are resolved before planning).
    A crash between two batches leaves the mark where it was: the next sync reads the same
    window again, finds the progress of the runs already committed and plans only what they
    have not reported (nothing, or usage that came since), and plans the rest in full. An event
    planned twice gets the same key, which the outbox stores once."""
    new = 0
    done: list[Plan] = []
    waiting: Optional[Plan] = None
    for batch in plans:  # one plan ahead, to know which is the last
        if waiting is not None:
            new += commit(store, waiting, now_at, None, clock=clock)
            done.append(without_events(waiting))
        waiting = batch
    if waiting is None:
        waiting = Plan((), (), ())
    new += commit(store, waiting, now_at, high_water_at, clock=clock)
    done.append(without_events(waiting))
    return merge_plans(done), new


def without_events(plan: Plan) -> Plan:
    """What a sync reports of a committed batch: its counts and lists, not its events."""
    return Plan(
        events=(),
        skipped=plan.skipped,
        rejected=plan.rejected,
        rating_problems=plan.rating_problems,
        records=plan.records,
        steps_ignored=plan.steps_ignored,
        held=plan.held,
        corrections=plan.corrections,
        read_rejected=plan.read_rejected,
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


def post_through_outbox(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    events: Sequence[PlannedEvent],
    clock: Clock = utc_now,
) -> tuple[int, DeliveryReport]:
    """Post repair or correction events the way a sync posts its own: committed to the
    outbox first (events above limits.hold_above held), then delivered with the exactly-once
    protocol. Each one is logged. Returns (events new to the outbox, the delivery report)."""
    for event in events:
        log.info(
            "posting event %s to allocation %s: %s %s",
            event.event_key,
            event.allocation,
            event.quantity,
            event.sku,
        )
    limit = config.limits.hold_above
    held = frozenset(e.event_key for e in events if limit and e.quantity > limit)
    plan = Plan(events=tuple(events), skipped=(), rejected=(), held=held)
    new = commit(store, plan, clock(), None, clock=clock)
    return new, deliver_outbox(store, client, clock, config.api.concurrency)


def compare_with_api(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    learn_from: datetime,
    *,
    take_over: bool = False,
    relearn: bool = False,
    clock: Clock = utc_now,
) -> ledger.Check:
    """ledger.check for this agent (its state file), cluster and mapped allocations."""
    return ledger.check(
        store,
        client,
        mapped_allocations(config),
        config.cluster,
        ledger.agent_id(store.path),
        now_at=clock(),
        learn_from=learn_from,
        take_over=take_over,
        relearn=relearn,
    )
