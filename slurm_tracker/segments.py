"""Segment stage: a job run + what was already reported -> the new usage only.

A run's usage is measured in elapsed seconds (ElapsedRaw: slurmdbd leaves suspended time out).
What was already reported is a number of those seconds; the new usage is the stretch
``[reported_s, elapsed_s)``. It is placed on the wall clock from the run's start
(``start_at + offset``), and cut at UTC month boundaries (and at any other instants the caller
passes, such as rate-rule changes) so that every piece falls in one billing period.

State names never decide anything here: a run is final when its End is known. The last
``sacct.lag`` seconds of a run that is not final are held back (see SegmentPolicy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Union

from slurm_tracker.models import JobRecord, Skipped, UsageSegment


@dataclass(frozen=True)
class SegmentPolicy:
    """How far and how eagerly running runs are billed."""

    reporting_interval_s: int = 900  # a running run is billed once this much new usage exists
    # The last seconds of a running run's ElapsedRaw are held back (sacct.lag). While slurmdbd
    # catches up after an outage, sacct shows jobs that have ended as still running, their
    # ElapsedRaw growing with the clock. ElapsedRaw grows at most one second per second, so
    # what it was ``holdback_s`` ago was certainly consumed, suspended jobs included.
    holdback_s: int = 0

    def billable_s(self, record: JobRecord) -> int:
        """The elapsed seconds of ``record`` that may be billed now."""
        if record.final:
            return record.elapsed_s
        return max(0, record.elapsed_s - self.holdback_s)


def month_starts(start_at: datetime, end_at: datetime) -> list[datetime]:
    """The first instants of UTC months strictly inside ``(start_at, end_at)``."""
    cuts: list[datetime] = []
    current = start_at.astimezone(timezone.utc)
    year, month = current.year, current.month
    while True:
        month += 1
        if month == 13:
            year, month = year + 1, 1
        cut = datetime(year, month, 1, tzinfo=timezone.utc)
        if cut >= end_at:
            return cuts
        cuts.append(cut)


def cut_points(
    start_at: datetime, end_at: datetime, extra: Iterable[datetime] = ()
) -> list[datetime]:
    """Month starts and ``extra`` instants inside ``(start_at, end_at)``, sorted, unique."""
    points = set(month_starts(start_at, end_at))
    points.update(p for p in extra if start_at < p < end_at)
    return sorted(points)


def new_usage(
    record: JobRecord,
    reported_s: int,
    policy: SegmentPolicy,
    extra_cuts: Iterable[datetime] = (),
) -> Union[list[UsageSegment], Skipped]:
    """The usage of ``record`` not yet reported, as segments, or why there is none now.

    ``reported_s`` is how many elapsed seconds of this run earlier syncs have already billed.
    Final runs always flush what is left; running runs wait until at least
    ``policy.reporting_interval_s`` of new usage has accumulated.
    """
    if record.start_at is None:
        return Skipped(record.job_id, "not started (pending): no usage yet", record.run)
    if record.elapsed_s <= 0:
        return Skipped(record.job_id, "zero elapsed time: no usage", record.run)
    billable_s = policy.billable_s(record)
    if reported_s >= billable_s:
        if reported_s > record.elapsed_s:
            # ElapsedRaw of a running run never shrinks; if it did, we never take usage back.
            # (A FINAL run below what was billed never gets here: it is recorded as a
            # correction by the plan stage, see corrections.py.)
            return Skipped(
                record.job_id,
                f"elapsed {record.elapsed_s} s is below the {reported_s} s already reported: "
                "nothing new (usage is never taken back)",
                record.run,
            )
        if not record.final and record.elapsed_s > reported_s:
            return Skipped(
                record.job_id,
                f"running: its last {record.elapsed_s - reported_s} s are held back for "
                f"sacct.lag ({policy.holdback_s} s: slurmdbd may still be catching up)",
                record.run,
            )
        return Skipped(record.job_id, "no new usage since the last sync", record.run)
    fresh_s = billable_s - reported_s
    if not record.final and fresh_s < policy.reporting_interval_s:
        return Skipped(
            record.job_id,
            f"running: {fresh_s} s of new usage, billed once {policy.reporting_interval_s} s "
            "have accumulated",
            record.run,
        )
    return split(record, reported_s, billable_s, extra_cuts)


def split(
    record: JobRecord, from_s: int, to_s: int, extra_cuts: Iterable[datetime] = ()
) -> list[UsageSegment]:
    """Elapsed seconds ``[from_s, to_s)`` of a started run, cut at month starts and ``extra_cuts``.

    Cuts fall on whole seconds from the run's start, so every piece has an integer length and
    the pieces add up to ``to_s - from_s`` exactly.
    """
    assert record.start_at is not None
    start_at = record.start_at
    begin_at = start_at + timedelta(seconds=from_s)
    finish_at = start_at + timedelta(seconds=to_s)
    offsets = [from_s]
    for point in cut_points(begin_at, finish_at, extra_cuts):
        offset = int((point - start_at).total_seconds())
        if from_s < offset < to_s and offset != offsets[-1]:
            offsets.append(offset)
    offsets.append(to_s)
    return [
        UsageSegment(
            record=record,
            from_s=a,
            to_s=b,
            started_at=start_at + timedelta(seconds=a),
            ended_at=start_at + timedelta(seconds=b),
        )
        for a, b in zip(offsets, offsets[1:])
    ]
