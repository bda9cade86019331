"""Planning: parsed job records -> the events to send, the runs skipped, the records rejected.

``plan_usage`` is pure: it takes parsed records and what was already reported and returns
every event to send, every skipped run and every rejected record (map -> segment -> plan ->
rate, with the plausibility checks and the billing floor).

A sync and a dry run stream instead (plan_stream): the input is read record by record
(parse.RecordStream), duplicate records of a run are resolved first in bounded memory
(inputs.duplicate_records), and :class:`Planner` plans batches of BATCH_RECORDS records, each
looked up in the state (what was reported) and committed (pipeline.commit_stream) or printed as
it comes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Optional, Union

from slurm_tracker import rating
from slurm_tracker.config import Config
from slurm_tracker.corrections import Correction, detect
from slurm_tracker.events import Rater, plan
from slurm_tracker.inputs import duplicate_records
from slurm_tracker.mapping import Mapper, Target
from slurm_tracker.models import (
    JobRecord,
    ParseResult,
    PlannedEvent,
    Rated,
    Rejected,
    RunKey,
    Skipped,
)
from slurm_tracker.parse import RecordStream
from slurm_tracker.plans import Plan
from slurm_tracker.plausibility import implausible
from slurm_tracker.segments import SegmentPolicy, new_usage
from slurm_tracker.times import utc_text

log = logging.getLogger(__name__)


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
                if (
                    forgotten_before is not None
                    and not reported_s
                    and run not in reported
                    and _forgotten(record, forgotten_before)
                ):
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
                    f"({utc_text(floor_at)}): not billed by this agent",
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


def _forgotten_skip(record: JobRecord, forgotten_before: datetime) -> Skipped:
    return Skipped(
        record.job_id,
        f"ended before {utc_text(forgotten_before)}, where the state file no longer "
        "remembers what was billed: it may have been billed already, so it is not billed again",
        record.run,
    )


def _rejected(record: JobRecord, reason: str) -> Rejected:
    """A record refused after parsing: quarantined under its run, with what it said."""
    start = utc_text(record.start_at) if record.start_at else "-"
    end = utc_text(record.end_at) if record.end_at else "-"
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
    inputs.duplicate_records: only the most advanced one is planned (at its own place in the
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
