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

This module is the entry point: :func:`reconcile` (all runs) and :func:`examine` (read the
API, then judge). The rest lives in :mod:`slurm_tracker.reconcile_model` (the values),
:mod:`slurm_tracker.reconcile_judge` (one run: :class:`Judge`),
:mod:`slurm_tracker.reconcile_repair` (:func:`plan_repair`, :func:`apply_repair`),
:mod:`slurm_tracker.reconcile_inputs` (:func:`read_records`, :func:`read_billed`...) and
:mod:`slurm_tracker.reconcile_output` (:func:`as_json`, :func:`as_text`); their names are
re-exported here on purpose (``__all__``): the CLI, migrate_state.py and the tests use them as
``reconcile.X``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Optional

from slurm_tracker import catalog_admin, inputs, ledger, pipeline, planning, rating
from slurm_tracker.config import Config
from slurm_tracker.ledger import BilledEvent, LegacyEvent
from slurm_tracker.models import JobRecord
from slurm_tracker.plausibility import implausible
from slurm_tracker.reconcile_inputs import (
    outbox_status,
    read_billed,
    read_records,
    read_since,
)
from slurm_tracker.reconcile_judge import (
    Judge,
    age_order,
    dedupe_only,
    duplicates,
    event_finding,
)
from slurm_tracker.reconcile_model import (
    KINDS,
    NOTICES,
    Deletion,
    Finding,
    Fix,
    Report,
    Total,
)
from slurm_tracker.reconcile_output import as_json, as_text
from slurm_tracker.reconcile_repair import (
    DELETED_REASON,
    UNSETTLED,
    Applied,
    Repair,
    apply_repair,
    plan_repair,
)
from slurm_tracker.segments import SegmentPolicy
from slurm_tracker.state import State

__all__ = [
    "DELETED_REASON",
    "KINDS",
    "NOTICES",
    "UNSETTLED",
    "Applied",
    "Deletion",
    "Finding",
    "Fix",
    "Judge",
    "Repair",
    "Report",
    "Total",
    "apply_repair",
    "as_json",
    "as_text",
    "examine",
    "outbox_status",
    "plan_repair",
    "read_billed",
    "read_records",
    "read_since",
    "reconcile",
]


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
            findings += duplicates(events, record.job_id)
            fixes += dedupe_only(text, events)
            continue
        judged += 1
        judge = Judge(record, events, config, policy, floor_at, catalog, agent)
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
            event_finding(
                "unknown-run", e, "", f"run {text} is not in slurmdbd's answer for the window"
            )
            for e in sorted(inside, key=age_order)
        ]
        findings += duplicates(events, "")
        fixes += dedupe_only(text, events)
    findings += [
        event_finding("other-agent", e, "", f"posted by agent {e.agent!r} (this one is {agent!r})")
        for e in sorted(ours, key=age_order)
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


def examine(
    config: Config,
    store: State,
    client: ledger.UsageLister,
    records: Sequence[JobRecord],
    window: inputs.Window,
    catalog: Optional[rating.Catalog] = None,
) -> Report:
    """Read the API's events for ``records`` and judge them (our agent: the state file's).

    The older Go agent's events are read too, whatever the state file says (``migrate
    state`` records a cutover, but a state file lost and made anew forgets it): they cover the
    core-hours that agent billed, and a repair blind to them would bill those twice. A site
    that never ran it pays one empty list call per allocation."""
    since = read_since(records, window)
    billed = read_billed(client, config, since)
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
