"""Plausibility of a job run's accounting record: what no real job can look like.

slurmdbd holds runaway and corrupted records (a Start in year 9999, End before Start, a CPU
count that is Slurm's "not set" marker minus one). Such a record is never billed: it is
rejected with the reason, quarantined in the state file and reported, and the rest of the
sync goes on. A later sane record of the same run (after an admin fixed it in slurmdbd) is
billed as usual and resolves the quarantine entry.

Pure: the caller passes the real clock (``now_at``), never ``--now``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Optional

from slurm_tracker.config import Limits
from slurm_tracker.models import JobRecord
from slurm_tracker.times import utc_text

#: No Slurm accounting record is older than this (slurmdbd appeared in 2008).
EARLIEST_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)


def implausible(record: JobRecord, now_at: datetime, limits: Limits) -> Optional[str]:
    """Why ``record`` cannot be billed as it is, or None when it is plausible.

    Only records that would bill something are judged: a run that never started or has no
    elapsed time produces no usage whatever its other fields say.
    """
    start_at = record.start_at
    if start_at is None or record.elapsed_s <= 0:
        return None
    skew = timedelta(seconds=limits.clock_skew_s)
    latest_at = now_at + skew
    end_at = record.end_at
    times = (("Submit", record.submit_at), ("Start", start_at), ("End", end_at))
    for name, value in times:
        if value is None:
            continue
        if value < EARLIEST_AT:
            return f"{name} {utc_text(value)} is before {EARLIEST_AT:%Y}: a corrupt record"
        if value > latest_at:
            return (
                f"{name} {utc_text(value)} is in the future (now {utc_text(now_at)}, tolerance "
                f"sacct clock skew {limits.clock_skew_s} s): a corrupt record or a wrong clock"
            )
    if start_at < record.submit_at - skew:
        return f"Start {utc_text(start_at)} is before Submit {utc_text(record.submit_at)}"
    if end_at is not None and end_at < start_at:
        return f"End {utc_text(end_at)} is before Start {utc_text(start_at)}"
    wall_s = ((end_at if end_at is not None else now_at) - start_at).total_seconds()
    if record.elapsed_s > wall_s + limits.clock_skew_s:
        upto = "End" if end_at is not None else "now"
        return (
            f"ElapsedRaw {record.elapsed_s} s is more than {upto} - Start ({int(wall_s)} s): "
            "a corrupt record"
        )
    tres = record.tres
    counts = (
        ("CPUs", tres.cpu, limits.max_cpus, "max_cpus"),
        ("GPUs", tres.gpu, limits.max_gpus, "max_gpus"),
        ("nodes", tres.node, limits.max_nodes, "max_nodes"),
        ("MiB of memory", tres.mem_mb, limits.max_mem_mb, "max_memory"),
    )
    for what, count, limit, key in counts:
        if count > limit:
            return (
                f"{count} allocated {what} is more than limits.{key} ({limit}): a corrupt "
                "record, or raise the limit if the cluster really has that many"
            )
    return None
