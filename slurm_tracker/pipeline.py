"""The data flow of one sync: read sacct -> parse -> map -> segment -> plan -> rate.

``plan_usage`` is pure: it takes parsed records and what was already reported and returns
every event to send, every skipped run and every rejected record. The functions around it
read the input (a saved file, or one sacct call) and pick the window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Optional, Union
from zoneinfo import ZoneInfo

from slurm_tracker import api, ledger, rating, sacct, state
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.corrections import Correction, detect

# re-exported (backfill.py imports them from here); they live in delivery.py
from slurm_tracker.delivery import DeliveryReport, deliver_outbox
from slurm_tracker.errors import (
    ApiError,
    InputError,
    SacctUnavailable,
    StateError,
)
from slurm_tracker.events import plan, request_body
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import (
    JobRecord,
    Metric,
    ParseResult,
    PlannedEvent,
    Rejected,
    RunKey,
    Skipped,
)
from slurm_tracker.parse import parse_live, parse_sacct
from slurm_tracker.plausibility import implausible
from slurm_tracker.segments import SegmentPolicy, new_usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """The sacct time window of a sync: jobs overlapping ``[start_at, end_at)``."""

    start_at: datetime
    end_at: datetime


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


def latest_records(records: Iterable[JobRecord]) -> tuple[list[JobRecord], list[Skipped]]:
    """One record per run: the most advanced one (final over running, then longest elapsed)."""
    best: dict[RunKey, JobRecord] = {}
    dropped: list[Skipped] = []
    for record in records:
        seen = best.get(record.run)
        if seen is None:
            best[record.run] = record
            continue
        keep, drop = (
            (record, seen)
            if (record.final, record.elapsed_s) > (seen.final, seen.elapsed_s)
            else (seen, record)
        )
        best[record.run] = keep
        dropped.append(
            Skipped(
                drop.job_id,
                f"duplicate record of this run (line {drop.line}): line {keep.line} is used",
                drop.run,
            )
        )
    return list(best.values()), dropped


def plan_usage(
    parsed: ParseResult,
    reported: Mapping[RunKey, int],
    config: Config,
    catalog: Optional[rating.Catalog] = None,
    *,
    now_at: Optional[datetime] = None,
    floor_at: Optional[datetime] = None,
    forgotten_before: Optional[datetime] = None,
    agent: str = "",
) -> Plan:
    """Plan the events for everything in ``parsed`` not yet in ``reported`` (elapsed seconds).

    ``now_at`` is the real clock, for the plausibility checks (None: no checks against the
    clock). Usage before ``floor_at`` (the billing floor) is not billed, nor runs that ended
    before ``forgotten_before`` (State.pruned_before) and have no progress: their billing
    record was pruned, so they may have been billed already. The last ``sacct.lag``
    seconds of running runs are held back (see SegmentPolicy). ``agent`` (agent_id) goes into
    every event's metadata. No record can stop the plan: any
    failure while planning one becomes a Rejected with the record's identity.
    """
    records, skipped = latest_records(parsed.records)
    policy = SegmentPolicy(config.reporting_interval_s, config.sacct.lag_s)
    rejected = list(parsed.rejected)
    events: list[PlannedEvent] = []
    problems: list[str] = []
    checked: set[str] = set()
    corrections: list[Correction] = []
    final_seen: list[tuple[str, int]] = []
    for record in records:
        try:
            if record.run not in reported and _forgotten(record, forgotten_before):
                skipped.append(_forgotten_skip(record, forgotten_before))
                continue  # not "checked": a quarantine entry of the run stays open
            outcome = _plan_record(
                record,
                reported.get(record.run, 0),
                config,
                catalog,
                (policy, now_at, floor_at, agent),
            )
        except Exception as exc:  # one record must never stop a sync
            log.debug("job %s: planning failed", record.job_id, exc_info=True)
            outcome = _rejected(record, f"cannot be planned ({type(exc).__name__}: {exc})")
        if isinstance(outcome, Rejected):
            rejected.append(outcome)
            continue
        checked.add(record.run.text)
        if isinstance(outcome, Correction):
            corrections.append(outcome)
            skipped.append(outcome.skipped)
            continue
        if record.final and 0 < reported.get(record.run, 0) <= record.elapsed_s:
            final_seen.append((record.run.text, record.elapsed_s))
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
            continue
        planned, record_problems = outcome
        events.extend(planned)
        problems.extend(record_problems)
    hold_above = config.limits.hold_above
    held = frozenset(e.event_key for e in events if hold_above and e.quantity > hold_above)
    return Plan(
        events=tuple(events),
        skipped=tuple(skipped),
        rejected=tuple(rejected),
        rating_problems=tuple(problems),
        records=len(parsed.records),
        steps_ignored=parsed.steps_ignored,
        held=held,
        checked_runs=frozenset(checked),
        corrections=tuple(corrections),
        final_seen=tuple(final_seen),
    )


def _plan_record(
    record: JobRecord,
    reported_s: int,
    config: Config,
    catalog: Optional[rating.Catalog],
    how: tuple[SegmentPolicy, Optional[datetime], Optional[datetime], str],
) -> Union[tuple[list[PlannedEvent], list[str]], Skipped, Rejected, Correction]:
    """The events of one run (with rating problems), or why it gives none (a Correction when
    slurmdbd now says less than was billed).

    ``how``: the segment policy, the real clock, the billing floor and the agent's id."""
    policy, now_at, floor_at, agent = how
    clusters = config.sacct.clusters
    if clusters and record.cluster not in clusters:
        return _rejected(
            record, f"cluster {record.cluster!r} is not one this agent bills (sacct.clusters)"
        )
    target = map_record(record, config.accounts, config.partitions)
    if isinstance(target, Skipped):
        return target
    if now_at is not None:
        problem = implausible(record, now_at, config.limits)
        if problem is not None:
            return _rejected(record, problem)
    correction = detect(
        record, reported_s, target.allocation, target.charges, config.metadata_fields
    )
    if correction is not None:
        return correction
    if floor_at is not None and record.start_at is not None:
        floor_s = int((floor_at - record.start_at).total_seconds())
        if floor_s >= policy.billable_s(record) and record.final:
            return Skipped(
                record.job_id,
                f"ended before the billing floor sacct.first_sync_start "
                f"({floor_at:%Y-%m-%dT%H:%M:%SZ}): not billed by this agent",
                record.run,
            )
        reported_s = max(reported_s, min(floor_s, record.elapsed_s))
    cuts = _rate_cuts(catalog, target, record, reported_s)
    segments = new_usage(record, reported_s, policy, cuts)
    if isinstance(segments, Skipped):
        return segments
    planned = plan(segments, target.allocation, target.charges, config.metadata_fields, agent)
    if not planned:
        metrics = ", ".join(sorted({c.metric for c in target.charges}))
        return Skipped(record.job_id, f"no allocated {metrics} to bill", record.run)
    events: list[PlannedEvent] = []
    problems: list[str] = []
    for event in planned:
        rated, problem = _rate(catalog, event)
        events.append(rated)
        if problem:
            problems.append(problem)
    return events, problems


def _forgotten(record: JobRecord, forgotten_before: Optional[datetime]) -> bool:
    """Whether the state file may have forgotten ``record``'s billing (it has no progress row).

    State.prune drops final runs whose billed usage ended (start + elapsed seconds) before its
    horizon; the same measure is used here, so every pruned run is caught, whatever suspended
    time put its real End later.
    """
    if forgotten_before is None or not record.final or record.start_at is None:
        return False
    return record.start_at + timedelta(seconds=record.elapsed_s) < forgotten_before


def _forgotten_skip(record: JobRecord, forgotten_before: Optional[datetime]) -> Skipped:
    return Skipped(
        record.job_id,
        f"ended before {forgotten_before:%Y-%m-%dT%H:%M:%SZ}, where the state file no longer "
        "remembers what was billed: it may have been billed already, so it is not billed again",
        record.run,
    )


def _rejected(record: JobRecord, reason: str) -> Rejected:
    """A record refused after parsing: quarantined under its run, with what it said."""
    start = f"{record.start_at:%Y-%m-%dT%H:%M:%SZ}" if record.start_at else "-"
    end = f"{record.end_at:%Y-%m-%dT%H:%M:%SZ}" if record.end_at else "-"
    tres = record.tres
    text = (
        f"job {record.job_id} cluster={record.cluster} account={record.account} "
        f"partition={record.partition} user={record.user} start={start} end={end} "
        f"elapsed={record.elapsed_s} cpu={tres.cpu} gpu={tres.gpu} node={tres.node} "
        f"mem_mb={tres.mem_mb}"
    )
    return Rejected(
        record.line, f"job {record.job_id}: {reason}", text[:300], record.job_id, record.run
    )


def _rate_cuts(
    catalog: Optional[rating.Catalog], target: Target, record: JobRecord, reported_s: int
) -> list[datetime]:
    """Rate-rule changes inside the new usage, so that every event has one rate."""
    if catalog is None or record.start_at is None or record.elapsed_s <= reported_s:
        return []
    begin_at = record.start_at + timedelta(seconds=reported_s)
    finish_at = record.start_at + timedelta(seconds=record.elapsed_s)
    cuts: set[datetime] = set()
    for charge in target.charges:
        if charge.sku in catalog.skus:
            cuts.update(rating.boundaries(catalog, charge.sku, begin_at, finish_at))
    return sorted(cuts)


def _rate(
    catalog: Optional[rating.Catalog], event: PlannedEvent
) -> tuple[PlannedEvent, Optional[str]]:
    if catalog is None:
        return event, None
    try:
        rated = rating.rate(catalog, event.sku, event.quantity, event.started_at, event.ended_at)
    except rating.RateMissing as exc:
        return event, f"{event.event_key}: {exc}"
    return replace(event, rated=rated), None


def totals(events: Sequence[PlannedEvent]) -> list[Total]:
    """Per allocation and SKU: quantity, rated amount and USD (sums of the per-event values)."""
    groups: dict[tuple[str, str], list[PlannedEvent]] = {}
    for event in events:
        groups.setdefault((event.allocation, event.sku), []).append(event)
    result = []
    for (allocation, sku), group in sorted(groups.items()):
        rated = [e.rated for e in group if e.rated is not None]
        all_rated = len(rated) == len(group)
        usd = [r.usd for r in rated if r.usd is not None]
        result.append(
            Total(
                allocation=allocation,
                sku=sku,
                metric=group[0].metric,
                quantity=sum((e.quantity for e in group), Decimal(0)),
                events=len(group),
                unit=rated[0].unit if all_rated and rated else None,
                amount=sum((r.amount for r in rated), Decimal(0)) if all_rated else None,
                usd=sum(usd, Decimal(0)) if all_rated and len(usd) == len(rated) else None,
            )
        )
    return result


def load_catalog(config: Config) -> Optional[rating.Catalog]:
    """The catalog named by the config (a file, else the inline section), if any."""
    if config.catalog_file is not None:
        return rating.load_catalog_file(config.catalog_file)
    if config.catalog is not None:
        return rating.catalog_from_data(config.catalog, f"{config.source}: catalog")
    return None


def read_saved(path: str, stdin: BinaryIO) -> bytes:
    """The bytes of a saved sacct capture (``-`` reads standard input)."""
    if path == "-":
        return stdin.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(
            f"cannot read sacct file {path}: {exc.strerror or exc}; check the path and permissions"
        ) from exc


@dataclass(frozen=True)
class Input:
    """sacct output to process, and how to read it."""

    data: bytes
    source: str
    window: Optional[Window]  # None for a saved file: the high-water mark is left alone
    delimiter: Optional[str] = None  # the live query's: read strictly (parse.parse_live)
    fields: tuple[str, ...] = ()


def read_live(config: Config, window: Window, environ: Mapping[str, str]) -> Input:
    """One sacct call for ``window`` (raises SacctUnavailable, a temporary failure).

    A fresh unpredictable delimiter every call, and JobName only when the config sends job
    names as metadata (see sacct.py).
    """
    delimiter = sacct.new_delimiter()
    fields = sacct.live_fields("job_name" in config.metadata_fields)
    argv = sacct.build_command(
        config.sacct.path,
        window.start_at,
        window.end_at,
        config.sacct.extra_args,
        delimiter=delimiter,
        fields=fields,
        clusters=config.sacct.clusters,
    )
    log.info("running sacct for %s .. %s", window.start_at, window.end_at)
    data = sacct.run_sacct(
        argv, timeout_s=config.sacct.timeout_s, environ=sacct.sacct_environment(environ)
    )
    return Input(data, f"sacct ({config.sacct.path})", window, delimiter, fields)


def file_zone(cfg: SacctConfig) -> tzinfo:
    """The zone of naive timestamps in saved files (the config validated the name)."""
    if cfg.file_timezone.upper() == "UTC":
        return timezone.utc
    return ZoneInfo(cfg.file_timezone)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def reported_after(plan: Plan, before: Mapping[RunKey, int]) -> dict[RunKey, int]:
    """What will have been reported per run once ``plan`` is stored (for chained dry runs)."""
    after = dict(before)
    for event in plan.events:
        after[event.run] = max(after.get(event.run, 0), event.to_s)
    return after


def gather(
    config: Config,
    window: Window,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
) -> Input:
    """The sacct output to process: a saved file, or one live call for ``window``."""
    if sacct_file is not None:
        data = read_saved(sacct_file, stdin)
        return Input(data, "stdin" if sacct_file == "-" else sacct_file, None)
    return read_live(config, window, environ)


def parse_input(config: Config, given: Input, fields: Optional[Sequence[str]]) -> ParseResult:
    """Records of ``given``: the live query's output strictly, a saved file as detected."""
    if given.delimiter is not None:
        try:
            return parse_live(
                given.data,
                delimiter=given.delimiter,
                fields=given.fields,
                cluster=config.cluster,
                source=given.source,
            )
        except InputError as exc:
            raise SacctUnavailable(
                f"{exc}; nothing was recorded or advanced, the next run tries again"
            ) from exc
    return parse_sacct(
        given.data,
        cluster=config.cluster,
        fields=fields,
        tz=file_zone(config.sacct),
        source=given.source,
    )


def chunks(start_at: datetime, end_at: datetime, chunk_s: int) -> list[Window]:
    """``[start_at, end_at)`` cut into windows of ``chunk_s`` seconds (the last may be shorter)."""
    windows = []
    current = start_at
    while current < end_at:
        step = min(end_at, current + timedelta(seconds=chunk_s))
        windows.append(Window(current, step))
        current = step
    return windows


ACKED_RETENTION_S = 30 * 86400  # acknowledged events are kept this long, for `status`


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


def commit(
    store: state.State, plan: Plan, now_at: datetime, high_water_at: Optional[datetime]
) -> int:
    """Store a plan in ONE transaction: outbox (held events held), progress, the high-water
    mark (never past the real clock), the quarantine of rejected records, the resolution of
    entries whose run now reads sane, and the corrections found."""
    if high_water_at is not None:
        high_water_at = min(high_water_at, utc_now())
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


def check_mark(store: state.State, config: Config) -> Optional[datetime]:
    """The high-water mark; StateError when it is in the future of the real clock."""
    mark = store.high_water_at()
    now_at = utc_now()
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
) -> SyncResult:
    """One regular sync: read, compare the API's record, plan, commit, deliver, prune.

    The caller holds the lock. Before anything is planned, the API's events of the cluster are
    compared with the state file (ledger.check): events it does not know are counted as billed,
    and another agent's events stop the sync (WriterConflict) unless ``take_over``.
    """
    floor_at = billing_floor(store, config)
    window = sync_window(request.now_at, check_mark(store, config), config.sacct, floor_at)
    given = gather(config, window, request.sacct_file, request.stdin, request.environ)
    agent = ledger.agent_id(store.path)
    compare_with_api(
        config,
        store,
        client,
        window.start_at - timedelta(seconds=ledger.LEARN_BEFORE_S),
        take_over=request.take_over,
    )
    if given.window is not None and store.floor_at() is None:
        store.set_floor(window.start_at)  # the first live sync: nothing before it is billed
        floor_at = billing_floor(store, config)
    parsed = parse_input(config, given, request.fields)
    reported = store.reported(r.run for r in parsed.records)
    plan = plan_usage(
        parsed,
        reported,
        config,
        catalog,
        now_at=utc_now(),
        floor_at=floor_at,
        forgotten_before=store.pruned_before(),
        agent=agent,
    )
    high_water_at = given.window.end_at if given.window else None
    new = commit(store, plan, request.now_at, high_water_at)
    return deliver_and_finish(config, store, client, plan, given.window, new, request.now_at)


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
) -> SyncResult:
    """Deliver what waits, prune, and record the outcome of a sync (or ``kind``: backfill,
    whose chunks were delivered as it went: ``delivered_before``)."""
    delivery = deliver_outbox(store, client, utc_now, config.api.concurrency)
    if delivered_before is not None:
        delivery = add_deliveries(delivered_before, delivery)
    store.prune(utc_now(), config.sacct.overlap_s, ACKED_RETENTION_S)
    result = SyncResult(plan, window, new, delivery, store.counts())
    store.record_sync(
        started_at,
        utc_now(),
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


def merge_plans(plans: Sequence[Plan]) -> Plan:
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


def post_through_outbox(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    events: Sequence[PlannedEvent],
    clock: Callable[[], datetime] = utc_now,
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
    new = commit(store, plan, clock(), None)
    return new, deliver_outbox(store, client, clock, config.api.concurrency)


def compare_with_api(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    learn_from: datetime,
    *,
    take_over: bool = False,
    relearn: bool = False,
) -> ledger.Check:
    """ledger.check for this agent (its state file), cluster and mapped allocations."""
    return ledger.check(
        store,
        client,
        mapped_allocations(config),
        config.cluster,
        ledger.agent_id(store.path),
        now_at=utc_now(),
        learn_from=learn_from,
        take_over=take_over,
        relearn=relearn,
    )


def mapped_allocations(config: Config) -> list[str]:
    accounts = config.accounts
    names = set(accounts.exact.values()) | {a for _, a in accounts.patterns}
    if accounts.default:
        names.add(accounts.default)
    return sorted(names)


def mapped_skus(config: Config) -> list[str]:
    parts = config.partitions
    charges = [c for cs in parts.exact.values() for c in cs]
    charges += [c for _, cs in parts.patterns for c in cs] + list(parts.default)
    return sorted({c.sku for c in charges})


def catalog_warnings(config: Config, catalog: rating.Catalog) -> list[str]:
    return [
        f"SKU {sku} is mapped in partitions but missing from the catalog: dry runs cannot rate it"
        for sku in mapped_skus(config)
        if sku not in catalog.skus
    ]


def check_online(config: Config, client: api.AllocationsClient) -> list[str]:
    """Problems found on the API: a refused key, missing allocations or SKU codes."""
    problems = []
    for name in mapped_allocations(config):
        try:
            client.get_allocation(name)
        except ApiError as exc:
            problems.append(f"allocation {name!r}: {exc}")
    codes: set[str] = set()
    for unit in client.list_units():
        codes.update(str(s.get("code")) for s in client.list_skus(str(unit.get("name"))))
    problems += [
        f"SKU {sku!r} is not among the organisation's SKUs"
        for sku in mapped_skus(config)
        if sku not in codes
    ]
    return problems


def pull_catalog(client: api.AllocationsClient, pulled_at: datetime) -> rating.Catalog:
    """The organisation's units, SKUs (archived ones too) and rate rules, from the API."""
    units = client.list_units()
    skus_by_unit: dict[str, list[dict[str, object]]] = {}
    rules_by_sku: dict[str, list[dict[str, object]]] = {}
    for unit in units:
        name = str(unit.get("name"))
        skus = client.list_skus(name, include_archived=True)
        skus_by_unit[name] = skus
        for sku in skus:
            sku_id = str(sku.get("id"))
            rules_by_sku[sku_id] = client.list_sku_rules(name, sku_id)
    return rating.catalog_from_api(units, skus_by_unit, rules_by_sku, pulled_at=pulled_at)
