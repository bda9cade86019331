"""Committing plans to the state: each batch's events, progress, quarantine and corrections in
ONE transaction, before anything is sent; the high-water mark with the last batch only.
(Part of the orchestration, :mod:`slurm_tracker.pipeline`, which re-exports these names.)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Optional

from slurm_tracker import state
from slurm_tracker.events import request_body
from slurm_tracker.models import RunKey
from slurm_tracker.plans import Plan, merge_plans
from slurm_tracker.windows import Clock, utc_now

__all__ = ["commit", "commit_stream", "without_events"]


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
