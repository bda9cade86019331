"""The data flow of one sync: read sacct -> parse -> map -> segment -> plan -> rate.

``plan_usage`` is pure: it takes parsed records and what was already reported and returns
every event to send, every skipped run and every rejected record. The functions around it
read the input (a saved file, or one sacct call) and pick the window.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Optional
from zoneinfo import ZoneInfo

from slurm_tracker import api, rating, sacct, state
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.errors import ApiError, InputError
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
from slurm_tracker.parse import parse_sacct
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


def sync_window(now_at: datetime, high_water_at: Optional[datetime], cfg: SacctConfig) -> Window:
    """From the high-water mark minus the overlap (or the first-sync start) to now minus the lag."""
    end_at = now_at - timedelta(seconds=cfg.lag_s)
    if high_water_at is not None:
        start_at = high_water_at - timedelta(seconds=cfg.overlap_s)
    elif cfg.first_sync_start is not None:
        start_at = cfg.first_sync_start
    else:
        start_at = end_at - timedelta(seconds=cfg.first_sync_lookback_s)
    return Window(start_at, max(start_at, end_at))


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
) -> Plan:
    """Plan the events for everything in ``parsed`` not yet in ``reported`` (elapsed seconds).

    The last ``sacct.lag`` seconds of running runs are held back (see SegmentPolicy).
    """
    records, skipped = latest_records(parsed.records)
    policy = SegmentPolicy(config.reporting_interval_s, config.sacct.lag_s)
    events: list[PlannedEvent] = []
    problems: list[str] = []
    for record in records:
        target = map_record(record, config.accounts, config.partitions)
        if isinstance(target, Skipped):
            skipped.append(target)
            continue
        reported_s = reported.get(record.run, 0)
        cuts = _rate_cuts(catalog, target, record, reported_s)
        segments = new_usage(record, reported_s, policy, cuts)
        if isinstance(segments, Skipped):
            skipped.append(segments)
            continue
        planned = plan(segments, target.allocation, target.charges, config.metadata_fields)
        if not planned:
            metrics = ", ".join(sorted({c.metric for c in target.charges}))
            skipped.append(Skipped(record.job_id, f"no allocated {metrics} to bill", record.run))
            continue
        for event in planned:
            rated, problem = _rate(catalog, event)
            events.append(rated)
            if problem:
                problems.append(problem)
    return Plan(
        events=tuple(events),
        skipped=tuple(skipped),
        rejected=parsed.rejected,
        rating_problems=tuple(problems),
        records=len(parsed.records),
        steps_ignored=parsed.steps_ignored,
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


def read_live(config: Config, window: Window, environ: Mapping[str, str]) -> bytes:
    """One sacct call for ``window`` (raises SacctUnavailable, a temporary failure)."""
    argv = sacct.build_command(
        config.sacct.path, window.start_at, window.end_at, config.sacct.extra_args
    )
    log.info("running sacct for %s .. %s", window.start_at, window.end_at)
    return sacct.run_sacct(
        argv, timeout_s=config.sacct.timeout_s, environ=sacct.sacct_environment(environ)
    )


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


GIVE_UP_AFTER_FAILURES = 3  # undeliverable events in a row that end a delivery pass


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery pass did with the outbox."""

    acked: int = 0
    found_by_lookup: int = 0
    dead: int = 0
    pending: int = 0
    unavailable: str = ""  # the last "API unavailable" message, if any
    auth_error: str = ""


def deliver_outbox(
    store: state.State,
    client: api.AllocationsClient,
    clock: Callable[[], datetime],
    concurrency: int = 1,
) -> DeliveryReport:
    """Send every pending event, at most ``concurrency`` at a time; never lose one.

    Each row is marked ``sending`` (committed) before each attempt; an earlier attempt whose
    outcome is unknown makes the next one look the event key up first (api.deliver).
    A rejected API key stops the pass (every other event would fail the same way), and so do
    GIVE_UP_AFTER_FAILURES events in a row that could not be delivered: an unreachable API must
    not hold one sync for hours, while one event the API keeps failing on blocks no other.
    """
    rows = store.to_send()
    counts = {"acked": 0, "found": 0, "dead": 0, "pending": 0, "failed_in_a_row": 0}
    messages = {"unavailable": "", "auth": ""}
    stop = threading.Event()
    guard = threading.Lock()

    def one(row: state.OutboxRow) -> None:
        if stop.is_set():
            with guard:
                counts["pending"] += 1
            return
        key = row.event_key
        try:
            outcome = api.deliver(
                client,
                row.allocation,
                row.body,
                key,
                outcome_unknown_before=row.needs_lookup,
                before_attempt=lambda _n: store.mark_sending(key, clock()),
            )
        except api.DeliveryFailed as exc:
            store.mark_pending(key, str(exc), exc.last_outcome_unknown, clock())
            with guard:
                counts["pending"] += 1
                counts["failed_in_a_row"] += 1
                messages["unavailable"] = str(exc)
                if counts["failed_in_a_row"] >= GIVE_UP_AFTER_FAILURES:
                    stop.set()  # the API is down: leave the rest for the next sync
            return
        except ApiError as exc:  # the key or the configuration was refused (401, 403...)
            store.mark_pending(key, str(exc), True, clock())  # look it up next time, to be safe
            stop.set()
            with guard:
                counts["pending"] += 1
                messages["auth"] = str(exc)
            return
        with guard:
            counts["failed_in_a_row"] = 0
        if outcome.status == "acked":
            store.mark_acked(key, outcome.event_id, clock())
            with guard:
                counts["acked"] += 1
                counts["found"] += int(outcome.found_by_lookup)
        else:
            store.mark_dead(key, outcome.error, clock())
            log.warning("event %s dead-lettered: %s", key, outcome.error)
            with guard:
                counts["dead"] += 1

    if concurrency <= 1:
        for row in rows:
            one(row)
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for future in [pool.submit(one, row) for row in rows]:
                future.result()
    return DeliveryReport(
        acked=counts["acked"],
        found_by_lookup=counts["found"],
        dead=counts["dead"],
        pending=counts["pending"],
        unavailable=messages["unavailable"],
        auth_error=messages["auth"],
    )


@dataclass(frozen=True)
class Input:
    data: bytes
    source: str
    window: Optional[Window]  # None for a saved file: the high-water mark is left alone


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
    return Input(read_live(config, window, environ), f"sacct ({config.sacct.path})", window)


def parse_input(config: Config, given: Input, fields: Optional[Sequence[str]]) -> ParseResult:
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


@dataclass(frozen=True)
class SyncResult:
    plan: Plan
    window: Optional[Window]
    new_events: int
    delivery: DeliveryReport
    outbox: Mapping[str, int]  # counts per status after delivery

    @property
    def outcome(self) -> str:
        """ok, undelivered (exit 4), unavailable (exit 75) or auth (exit 1)."""
        if self.delivery.auth_error:
            return "auth"
        if self.delivery.unavailable and self.delivery.acked == 0:
            return "unavailable"
        if (
            self.outbox.get("pending", 0)
            or self.outbox.get("sending", 0)
            or self.outbox.get("dead", 0)
        ):
            return "undelivered"
        return "ok"


def commit(
    store: state.State, plan: Plan, now_at: datetime, high_water_at: Optional[datetime]
) -> int:
    """Store a plan (outbox + progress + high-water mark) in one transaction."""
    return store.commit_plan(
        plan.events, [request_body(e) for e in plan.events], now_at, high_water_at
    )


def sync_once(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog],
    request: SyncRequest,
) -> SyncResult:
    """One regular sync: read, plan, commit, deliver, prune. The caller holds the lock."""
    window = sync_window(request.now_at, store.high_water_at(), config.sacct)
    given = gather(config, window, request.sacct_file, request.stdin, request.environ)
    parsed = parse_input(config, given, request.fields)
    reported = store.reported(r.run for r in parsed.records)
    plan = plan_usage(parsed, reported, config, catalog)
    high_water_at = given.window.end_at if given.window else None
    new = commit(store, plan, request.now_at, high_water_at)
    return _deliver_and_finish(config, store, client, plan, given.window, new, request.now_at)


def _deliver_and_finish(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    plan: Plan,
    window: Optional[Window],
    new: int,
    started_at: datetime,
) -> SyncResult:
    delivery = deliver_outbox(store, client, utc_now, config.api.concurrency)
    store.prune(utc_now(), config.sacct.overlap_s, ACKED_RETENTION_S)
    result = SyncResult(plan, window, new, delivery, store.counts())
    store.record_sync(
        started_at,
        utc_now(),
        result.outcome,
        {
            "planned": new,
            "posted": delivery.acked,
            "pending": result.outbox.get("pending", 0),
            "dead": result.outbox.get("dead", 0),
            "skipped": len(plan.skipped),
            "rejected": len(plan.rejected),
        },
    )
    return result


def backfill_plan(
    config: Config,
    store: state.State,
    catalog: Optional[rating.Catalog],
    windows: Sequence[Window],
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> Plan:
    """A dry backfill: every chunk planned as if the ones before it had been stored."""
    check_backfill_range(store, windows)
    reported: dict[RunKey, int] = {}
    plans = []
    for number, window in enumerate(windows):
        if number:
            sleep(config.sacct.backfill_pause_s)
        parsed = parse_input(
            config, Input(read_live(config, window, environ), "sacct", window), None
        )
        runs = {r.run for r in parsed.records}
        known = {**store.reported(runs), **{r: s for r, s in reported.items() if r in runs}}
        plan = plan_usage(parsed, known, config, catalog)
        reported.update(reported_after(plan, known))
        plans.append(plan)
    return merge_plans(plans)


def backfill(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog],
    windows: Sequence[Window],
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> SyncResult:
    """Load history chunk by chunk: each chunk committed before the next sacct call."""
    check_backfill_range(store, windows)
    plans = []
    new = 0
    started_at = utc_now()
    for number, window in enumerate(windows):
        if number:
            sleep(config.sacct.backfill_pause_s)
        log.info("backfill chunk %d/%d", number + 1, len(windows))
        parsed = parse_input(
            config, Input(read_live(config, window, environ), "sacct", window), None
        )
        reported = store.reported(r.run for r in parsed.records)
        plan = plan_usage(parsed, reported, config, catalog)
        new += commit(store, plan, utc_now(), None)
        plans.append(plan)
    whole = Window(windows[0].start_at, windows[-1].end_at) if windows else None
    return _deliver_and_finish(config, store, client, merge_plans(plans), whole, new, started_at)


def check_backfill_range(store: state.State, windows: Sequence[Window]) -> None:
    """Refuse a backfill into a period whose billing records were pruned (it would bill twice)."""
    pruned = store.pruned_before()
    if windows and pruned is not None and windows[0].start_at < pruned:
        raise InputError(
            f"backfill from {windows[0].start_at:%Y-%m-%d %H:%M} reaches before "
            f"{pruned:%Y-%m-%d %H:%M}, where the state file no longer remembers what was "
            "billed: runs from then would be billed twice. Start the backfill at or after "
            f"{pruned:%Y-%m-%dT%H:%M:%SZ}."
        )


def merge_plans(plans: Sequence[Plan]) -> Plan:
    return Plan(
        events=tuple(e for p in plans for e in p.events),
        skipped=tuple(s for p in plans for s in p.skipped),
        rejected=tuple(r for p in plans for r in p.rejected),
        rating_problems=tuple(x for p in plans for x in p.rating_problems),
        records=sum(p.records for p in plans),
        steps_ignored=sum(p.steps_ignored for p in plans),
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


def write_atomically(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
