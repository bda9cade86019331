"""The data flow of one sync: read sacct -> parse -> map -> segment -> plan -> rate.

``plan_usage`` is pure: it takes parsed records and what was already reported and returns
every event to send, every skipped run and every rejected record. The functions around it
read the input (a saved file, or one sacct call) and pick the window.

A sync and a dry run stream instead (plan_stream): the input is read record by record
(parse.RecordStream), duplicate records of a run are resolved first in bounded memory
(duplicate_records), and :class:`Planner` plans batches of BATCH_RECORDS records, each looked
up in the state (what was reported) and committed (commit_stream) or printed as it comes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union
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
from slurm_tracker.events import Rater, plan, request_body
from slurm_tracker.mapping import Mapper, Target
from slurm_tracker.models import (
    JobRecord,
    Metric,
    ParseResult,
    PlannedEvent,
    Rated,
    Rejected,
    RunKey,
    Skipped,
)
from slurm_tracker.parse import RecordStream, live_stream, parse_live, parse_sacct, saved_stream
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
    read_rejected: int = 0  # the first ones of ``rejected`` were refused by the reader


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

    One batch of everything: :class:`Planner` plans an input in batches (see plan_stream).
    """
    records, skipped = latest_records(parsed.records)
    planner = Planner(
        config,
        catalog,
        now_at=now_at,
        floor_at=floor_at,
        forgotten_before=forgotten_before,
        agent=agent,
    )
    return planner.plan(
        records,
        reported,
        rejected=parsed.rejected,
        skipped=skipped,
        count=len(parsed.records),
        steps_ignored=parsed.steps_ignored,
    )


class Planner:
    """Plans job records batch by batch: what :func:`plan_usage` does for a whole input, in
    pieces, so that a large input flows through parse -> plan -> output (or the state) in
    bounded memory. Batches are independent: a run's records must all be in one batch (see
    plan_stream, which keeps only the most advanced record of a run)."""

    def __init__(
        self,
        config: Config,
        catalog: Optional[rating.Catalog] = None,
        *,
        now_at: Optional[datetime] = None,
        floor_at: Optional[datetime] = None,
        forgotten_before: Optional[datetime] = None,
        agent: str = "",
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.now_at = now_at
        self.floor_at = floor_at
        self.forgotten_before = forgotten_before
        self.agent = agent
        self.policy = SegmentPolicy(config.reporting_interval_s, config.sacct.lag_s)
        self.mapper = Mapper(config.accounts, config.partitions)
        self.rater = _rater(catalog)

    def plan(
        self,
        records: Iterable[JobRecord],
        reported: Mapping[RunKey, int],
        *,
        rejected: Iterable[Rejected] = (),
        skipped: Iterable[Skipped] = (),
        count: int = 0,
        steps_ignored: int = 0,
    ) -> Plan:
        """The plan of ``records`` (one per run) given what was ``reported`` of their runs.
        ``rejected`` and ``skipped`` (by the reader) come first in the plan's lists; ``count``
        (the records read, duplicates included) and ``steps_ignored`` are passed through."""
        forgotten_before = self.forgotten_before
        rejected = list(rejected)
        read_rejected = len(rejected)
        skipped = list(skipped)
        events: list[PlannedEvent] = []
        problems: list[str] = []
        checked: set[str] = set()
        corrections: list[Correction] = []
        final_seen: list[tuple[str, int]] = []
        for record in records:
            run = record.run
            reported_s = reported.get(run, 0)
            try:
                if not reported_s and run not in reported and _forgotten(record, forgotten_before):
                    skipped.append(_forgotten_skip(record, forgotten_before))
                    continue  # not "checked": a quarantine entry of the run stays open
                outcome = self._plan_record(record, reported_s, problems)
            except Exception as exc:  # one record must never stop a sync
                log.debug("job %s: planning failed", record.job_id, exc_info=True)
                outcome = _rejected(record, f"cannot be planned ({type(exc).__name__}: {exc})")
            if isinstance(outcome, list):  # events: the common case first
                checked.add(run.text)
                if record.final and 0 < reported_s <= record.elapsed_s:
                    final_seen.append((run.text, record.elapsed_s))
                events.extend(outcome)
                continue
            if isinstance(outcome, Rejected):
                rejected.append(outcome)
                continue
            checked.add(run.text)
            if isinstance(outcome, Correction):
                corrections.append(outcome)
                skipped.append(outcome.skipped)
                continue
            if record.final and 0 < reported_s <= record.elapsed_s:
                final_seen.append((run.text, record.elapsed_s))
            assert isinstance(outcome, Skipped)
            skipped.append(outcome)
        hold_above = self.config.limits.hold_above
        held = frozenset(e.event_key for e in events if hold_above and e.quantity > hold_above)
        return Plan(
            events=tuple(events),
            skipped=tuple(skipped),
            rejected=tuple(rejected),
            rating_problems=tuple(problems),
            records=count,
            steps_ignored=steps_ignored,
            held=held,
            checked_runs=frozenset(checked),
            corrections=tuple(corrections),
            final_seen=tuple(final_seen),
            read_rejected=read_rejected,
        )

    def _plan_record(
        self, record: JobRecord, reported_s: int, problems: list[str]
    ) -> Union[list[PlannedEvent], Skipped, Rejected, Correction]:
        """The events of one run (its rating problems added to ``problems``), or why it gives
        none (a Correction when slurmdbd now says less than was billed)."""
        config = self.config
        clusters = config.sacct.clusters
        if clusters and record.cluster not in clusters:
            return _rejected(
                record, f"cluster {record.cluster!r} is not one this agent bills (sacct.clusters)"
            )
        target = self.mapper(record)
        if isinstance(target, Skipped):
            return target
        if self.now_at is not None:
            problem = implausible(record, self.now_at, config.limits)
            if problem is not None:
                return _rejected(record, problem)
        correction = detect(
            record, reported_s, target.allocation, target.charges, config.metadata_fields
        )
        if correction is not None:
            return correction
        policy = self.policy
        floor_at = self.floor_at
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
        cuts = _rate_cuts(self.catalog, target, record, reported_s)
        segments = new_usage(record, reported_s, policy, cuts)
        if isinstance(segments, Skipped):
            return segments
        found: list[str] = []
        planned = plan(
            segments,
            target.allocation,
            target.charges,
            config.metadata_fields,
            self.agent,
            self.rater,
            found,
        )
        if not planned:
            metrics = ", ".join(sorted({c.metric for c in target.charges}))
            return Skipped(record.job_id, f"no allocated {metrics} to bill", record.run)
        problems.extend(found)
        return planned


def _rater(catalog: Optional[rating.Catalog]) -> Optional[Rater]:
    """Rates each event with the catalog's engine as it is planned (None: no catalog)."""
    if catalog is None:
        return None

    def rate(
        key: str, sku: str, quantity: Decimal, started_at: datetime, ended_at: datetime
    ) -> tuple[Optional[Rated], Optional[str]]:
        try:
            return rating.rate(catalog, sku, quantity, started_at, ended_at), None
        except rating.RateMissing as exc:
            return None, f"{key}: {exc}"

    return rate


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


class Totals:
    """Per allocation and SKU: quantity, rated amount and USD, summed event by event (the
    same additions in the same order as over a list of every event, so the same Decimals)."""

    def __init__(self) -> None:
        # (allocation, sku) -> [metric, events, quantity, rated events, unit of the first rated,
        #                       amount, events with a USD value, usd]
        self._groups: dict[tuple[str, str], list[Any]] = {}

    def add(self, events: Iterable[PlannedEvent]) -> None:
        groups = self._groups
        for event in events:
            group = groups.get((event.allocation, event.sku))
            if group is None:
                group = groups[(event.allocation, event.sku)] = [
                    event.metric, 0, Decimal(0), 0, None, Decimal(0), 0, Decimal(0)
                ]  # fmt: skip
            group[1] += 1
            group[2] += event.quantity
            rated = event.rated
            if rated is not None:
                if group[3] == 0:
                    group[4] = rated.unit
                group[3] += 1
                group[5] += rated.amount
                if rated.usd is not None:
                    group[6] += 1
                    group[7] += rated.usd

    def result(self) -> list[Total]:
        result = []
        for (allocation, sku), group in sorted(self._groups.items()):
            metric, events, quantity, rated, unit, amount, with_usd, usd = group
            all_rated = rated == events
            result.append(
                Total(
                    allocation=allocation,
                    sku=sku,
                    metric=metric,
                    quantity=quantity,
                    events=events,
                    unit=unit if all_rated and rated else None,
                    amount=amount if all_rated else None,
                    usd=usd if all_rated and with_usd == rated else None,
                )
            )
        return result


def totals(events: Sequence[PlannedEvent]) -> list[Total]:
    """Per allocation and SKU: quantity, rated amount and USD (sums of the per-event values)."""
    found = Totals()
    found.add(events)
    return found.result()


# --- streaming: parse -> plan -> output (or the state) in bounded batches ----------------------

#: Records planned at a time by plan_stream (and looked up in the state at a time).
BATCH_RECORDS = 2000


def plan_stream(
    stream: RecordStream,
    planner: Planner,
    reported_of: Callable[[Sequence[RunKey]], Mapping[RunKey, int]],
    batch: int = BATCH_RECORDS,
) -> Iterator[Plan]:
    """The plans of an input, batch by batch (at least one plan, maybe empty): together what
    :func:`plan_usage` plans for the whole input, in bounded memory.

    ``reported_of`` gives what was reported of the runs of a batch (State.reported). Duplicate
    records of a run (``sacct --duplicates``, or captures put together) are found first, by
    :func:`duplicate_records`: only the most advanced one is planned (at its own place in the
    input; plan_usage plans it where the run's first record is), the others are skipped, their
    Skipped first in the first plan as plan_usage has them. Rejected records of the reader come
    first in each plan's ``rejected`` (``read_rejected`` of them).
    """
    keep, skipped = duplicate_records(stream)
    records: list[JobRecord] = []
    rejected: list[Rejected] = []
    count = steps = 0
    for item in stream.items():
        if item is None:
            steps += 1
        elif isinstance(item, Rejected):
            rejected.append(item)
        else:
            count += 1
            if keep and keep.get(item.run, item.line) != item.line:
                continue  # a duplicate record of the run: skipped (in ``skipped``)
            records.append(item)
        if len(records) + len(rejected) >= batch:
            yield _plan_batch(planner, reported_of, records, rejected, skipped, count, steps)
            records, rejected, skipped, count, steps = [], [], [], 0, 0
    yield _plan_batch(planner, reported_of, records, rejected, skipped, count, steps)


def _plan_batch(
    planner: Planner,
    reported_of: Callable[[Sequence[RunKey]], Mapping[RunKey, int]],
    records: list[JobRecord],
    rejected: list[Rejected],
    skipped: list[Skipped],
    count: int,
    steps: int,
) -> Plan:
    reported = reported_of([r.run for r in records]) if records else {}
    return planner.plan(
        records, reported, rejected=rejected, skipped=skipped, count=count, steps_ignored=steps
    )


#: Bits of the filter that finds job ids read more than once (16 MiB, whatever the input's
#: size: ~1e-5 false candidates per record at 1M records, ~0.8 % at 10M).
_SEEN_BITS = 1 << 27


def duplicate_records(stream: RecordStream) -> tuple[dict[RunKey, int], list[Skipped]]:
    """Runs read more than once, with the line of the record of each that is planned (the
    most advanced: final over running, then the longest elapsed, then the first), and the
    Skipped of the others, as :func:`latest_records` gives them.

    In bounded memory whatever the input's order: a first pass puts every record's
    (cluster, JobIDRaw) through a Bloom filter of fixed size; the ids it has seen before
    (every id of a duplicated run, and a few false candidates) are read in full by a second
    pass, which keeps a small tuple per candidate run. sacct prints one record per run unless
    a run was written twice (``--duplicates`` lists requeued runs, whose Submit differs, so
    they are different runs), so this usually finds nothing and the second pass is skipped.
    """
    bits = bytearray(_SEEN_BITS >> 3)
    mask = _SEEN_BITS - 1
    candidates: set[tuple[str, str]] = set()
    identity = stream.identity
    for framed in stream.framed():
        key = identity(framed)
        if key is None:
            continue
        h = hash(key)
        seen = True
        for index in (h & mask, (h >> 27) & mask, hash((h, 7)) & mask):
            byte, bit = index >> 3, 1 << (index & 7)
            if not bits[byte] & bit:
                bits[byte] |= bit
                seen = False
        if seen:
            candidates.add(key)
    del bits
    if not candidates:
        return {}, []
    # per candidate run: the kept record's (final, elapsed, line, job id), and how many were read
    best: dict[RunKey, tuple[tuple[bool, int, int, str], int]] = {}
    dropped: list[Skipped] = []
    for framed in stream.framed():
        if identity(framed) not in candidates:
            continue
        record = stream.read(framed)
        if not isinstance(record, JobRecord):
            continue
        run = record.run
        now = (record.final, record.elapsed_s, record.line, record.job_id)
        seen_as = best.get(run)
        if seen_as is None:
            best[run] = (now, 1)
            continue
        kept, read = seen_as
        keep, drop = (now, kept) if now[:2] > kept[:2] else (kept, now)
        best[run] = (keep, read + 1)
        dropped.append(
            Skipped(
                drop[3],
                f"duplicate record of this run (line {drop[2]}): line {keep[2]} is used",
                run,
            )
        )
    return {run: kept[2] for run, (kept, read) in best.items() if read > 1}, dropped


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
) -> DryRun:
    """Plan what a sync would, from the state as it is (opened read-only), changing nothing.

    The input flows through parse -> plan -> output in batches (plan_stream): memory stays
    bounded whatever its size."""
    floor_at = billing_floor(store, config)
    window = sync_window(now_at, check_mark(store, config), config.sacct, floor_at)
    stream, read_window = open_input(config, window, sacct_file, fields, stdin, environ)
    if read_window is not None and store.floor_at() is None:
        floor_at = max(window.start_at, floor_at or window.start_at)  # as the sync would
    planner = Planner(
        config,
        catalog,
        now_at=utc_now(),
        floor_at=floor_at,
        forgotten_before=store.pruned_before(),
        agent=agent,
    )
    return DryRun(plan_stream(stream, planner, store.reported), read_window, stream.source)


def open_input(
    config: Config,
    window: Window,
    sacct_file: Optional[str],
    fields: Optional[Sequence[str]],
    stdin: BinaryIO,
    environ: Mapping[str, str],
) -> tuple[RecordStream, Optional[Window]]:
    """The records to plan, as a stream: a saved file (read block by block; standard input is
    spooled to a temporary file first, as it is read twice), or one live sacct call for
    ``window`` (returned with it)."""
    if sacct_file is None:
        given = read_live(config, window, environ)
        assert given.delimiter is not None
        try:
            stream = live_stream(
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
        return stream, window
    source = "stdin" if sacct_file == "-" else sacct_file
    opener = _spooled(stdin) if sacct_file == "-" else _opener(sacct_file)
    stream = saved_stream(
        opener, cluster=config.cluster, fields=fields, tz=file_zone(config.sacct), source=source
    )
    return stream, None


def _opener(path: str) -> Callable[[], BinaryIO]:
    """Opens ``path`` (once per pass); InputError now when it cannot be read."""

    def open_it() -> BinaryIO:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise InputError(
                f"cannot read sacct file {path}: {exc.strerror or exc}; check the path and "
                "permissions"
            ) from exc

    open_it().close()
    return open_it


def _spooled(stdin: BinaryIO) -> Callable[[], BinaryIO]:
    """Standard input copied to an anonymous temporary file, opened once per pass."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (kept open by the opener)
    shutil.copyfileobj(stdin, spool, 1 << 20)
    spool.flush()  # the passes read it through their own descriptors

    def open_it() -> BinaryIO:
        handle = os.fdopen(os.dup(spool.fileno()), "rb")
        handle.seek(0)
        return handle

    return open_it


def chunks(start_at: datetime, end_at: datetime, chunk_s: int) -> list[Window]:
    """``[start_at, end_at)`` cut into windows of ``chunk_s`` seconds (the last may be shorter)."""
    windows = []
    current = start_at
    while current < end_at:
        step = min(end_at, current + timedelta(seconds=chunk_s))
        windows.append(Window(current, step))
        current = step
    return windows


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

    The input is planned and committed in batches (plan_stream, commit_stream): the outbox and
    progress of each batch in one transaction, the high-water mark with the last one only.
    """
    floor_at = billing_floor(store, config)
    window = sync_window(request.now_at, check_mark(store, config), config.sacct, floor_at)
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
    )
    if read_window is not None and store.floor_at() is None:
        store.set_floor(window.start_at)  # the first live sync: nothing before it is billed
        floor_at = billing_floor(store, config)
    planner = Planner(
        config,
        catalog,
        now_at=utc_now(),
        floor_at=floor_at,
        forgotten_before=store.pruned_before(),
        agent=agent,
    )
    high_water_at = read_window.end_at if read_window else None
    plans = plan_stream(stream, planner, store.reported)
    plan, new = commit_stream(store, plans, request.now_at, high_water_at)
    return deliver_and_finish(config, store, client, plan, read_window, new, request.now_at)


def commit_stream(
    store: state.State,
    plans: Iterable[Plan],
    now_at: datetime,
    high_water_at: Optional[datetime],
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
            new += commit(store, waiting, now_at, None)
            done.append(_without_events(waiting))
        waiting = batch
    if waiting is None:
        waiting = Plan((), (), ())
    new += commit(store, waiting, now_at, high_water_at)
    done.append(_without_events(waiting))
    return merge_plans(done), new


def _without_events(plan: Plan) -> Plan:
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
