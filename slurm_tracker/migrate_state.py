"""``slurm-tracker migrate state``: carry the older Go agent's progress over, so that the first
sync bills only what the old agent did not.

The Go agent (parallelworks/slurm-tracker) keeps one SQLite table, ``job_states(job_id INTEGER
PRIMARY KEY, last_reported_elapsed, last_reported_at, total_core_hours, completed_at)``: per
numeric job id (the JobIDRaw, array tasks included) the elapsed seconds it billed as core-hours,
and until when (``last_reported_at`` = Start + those seconds while the job runs, End once it
ended; ``completed_at`` 0 or NULL while it runs). It knows nothing of clusters or requeues, so
each old row is matched to one run of slurmdbd's: the run of that JobIDRaw (on one of this
agent's clusters) that was running at ``last_reported_at``. A row that matches no run, several,
or a run that cannot have run that long by then (a job id reused after Slurm wrapped it at
MaxJobId) is listed, never guessed.

The billing floor and the high-water mark go to the cutover: the old agent's last report, or
earlier when a run it was billing had stopped being reported before (its unbilled seconds are
then billed, not lost); never more than LOOKBACK_S before the last report. Runs that ended
before the floor are not billed by a sync, runs across it are billed from the later of the
floor and what the old agent billed. Earlier runs of a requeued job (the old agent billed the
job id as one) are recorded as billed in full: under-billing at worst, never twice.

``plan`` is pure (the old rows, read by ``migrate.read_old_state``, and the runs sacct
returned); ``migrate`` reads both and records the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Optional

from slurm_tracker import inputs, pipeline, reconcile
from slurm_tracker.config import Config
from slurm_tracker.errors import StateError
from slurm_tracker.migrate import OldJob, read_old_state
from slurm_tracker.models import JobRecord
from slurm_tracker.state import State, StateLock
from slurm_tracker.times import utc_text

#: The floor never goes further back than this before the old agent's last report.
LOOKBACK_S = 86400
#: Seconds of slack when comparing the old agent's numbers with slurmdbd's (clocks, rounding).
SLACK_S = 5


@dataclass(frozen=True)
class Carried:
    """A run whose first ``billed_s`` elapsed seconds the old agent billed."""

    job_id: int
    record: JobRecord
    billed_s: int
    from_s: int  # where the first sync bills from: max(billed_s, the floor's offset)
    note: str = ""  # e.g. "earlier run of a requeued job"

    @property
    def final(self) -> bool:
        return self.record.final and self.billed_s >= self.record.elapsed_s

    @property
    def next_s(self) -> int:
        """Seconds the first sync would bill, as slurmdbd says now (a running run grows)."""
        return max(0, self.record.elapsed_s - self.from_s)

    def row(self) -> tuple[str, int, int, bool]:
        """The progress row (State.import_progress)."""
        start = self.record.start_at or self.record.submit_at
        end = int(start.timestamp()) + self.billed_s
        return (self.record.run.text, self.billed_s, end, self.final)


@dataclass(frozen=True)
class Migration:
    """What ``migrate state`` would record, and what stops it."""

    floor_at: datetime
    window_start_at: datetime
    carried: tuple[Carried, ...]
    problems: tuple[str, ...]  # each stops the migration (exit 3, nothing written)
    unknown: tuple[str, ...]  # listed: nothing to carry over
    skipped: tuple[str, ...] = ()  # left out on request (--skip)
    ignored: int = 0  # rows too old to matter
    warnings: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------ planning


def last_report(jobs: Sequence[OldJob]) -> Optional[datetime]:
    """The old agent's last report: the latest time its state mentions."""
    times = [t for j in jobs for t in (j.reported_at, j.completed_at) if t is not None]
    return max(times) if times else None


def sacct_window_start(jobs: Sequence[OldJob], overlap_s: int) -> Optional[datetime]:
    """Where the sacct read starts: far enough back for every run that can matter."""
    last = last_report(jobs)
    if last is None:
        return None
    return last - timedelta(seconds=LOOKBACK_S + overlap_s)


def plan(
    jobs: Sequence[OldJob],
    records: Sequence[JobRecord],
    clusters: Sequence[str],
    *,
    overlap_s: int,
    skip: Iterable[int] = (),
    first_sync_start: Optional[datetime] = None,
) -> Migration:
    """Match the old rows to slurmdbd's runs (``records``: one per run, of ``clusters``) and
    say what is carried over, where the floor goes, and what stops the migration."""
    last = last_report(jobs)
    if last is None:
        raise StateError("the old agent's state has no job: there is nothing to migrate")
    window_start = last - timedelta(seconds=LOOKBACK_S + overlap_s)
    skip_ids = set(skip)
    by_id: dict[str, list[JobRecord]] = {}
    for record in records:
        if record.cluster in clusters:
            by_id.setdefault(record.job_id_raw, []).append(record)
    problems: list[str] = []
    unknown: list[str] = []
    skipped: list[str] = []
    chosen: list[tuple[OldJob, JobRecord, list[JobRecord]]] = []
    ignored = 0
    for job in jobs:
        if not job.running and job.reported_at < window_start:
            ignored += 1  # ended long before the cutover: no sync will read it again
            continue
        if job.job_id in skip_ids:
            skipped.append(f"job {job.job_id}: left out (--skip): a sync bills it as if new")
            continue
        runs = sorted(by_id.get(str(job.job_id), []), key=lambda r: r.submit_at)
        outcome = _match(job, runs)
        if isinstance(outcome, JobRecord):
            chosen.append((job, outcome, runs))
        elif outcome.startswith("unknown:"):
            unknown.append(f"job {job.job_id}: {outcome[len('unknown: ') :]}")
        else:
            problems.append(f"job {job.job_id}: {outcome}")
    floor = last
    for job, record, _ in chosen:
        start = record.start_at
        if start is not None and record.elapsed_s > job.reported_s:
            floor = min(floor, start + timedelta(seconds=job.reported_s))
    floor = max(floor, window_start + timedelta(seconds=overlap_s))
    if first_sync_start is not None and first_sync_start > floor:
        problems.append(
            f"sacct.first_sync_start ({utc_text(first_sync_start)}) is after the cutover "
            f"({utc_text(floor)}): usage the old agent did not bill before it would never be "
            "billed; remove sacct.first_sync_start from the config (the migrated floor "
            "replaces it)"
        )
    carried: list[Carried] = []
    for job, record, runs in chosen:
        carried.append(_carried(job.job_id, record, job.reported_s, floor))
        for earlier in runs:
            if earlier.cluster == record.cluster and earlier.submit_at < record.submit_at:
                carried.append(
                    _carried(
                        job.job_id,
                        earlier,
                        earlier.elapsed_s,
                        floor,
                        "earlier run of a requeued job: the old agent billed the job id as "
                        "one, so this run counts as billed in full",
                    )
                )
    seen: set[str] = set()
    unique = []
    for c in carried:
        if c.record.run.text not in seen:
            seen.add(c.record.run.text)
            unique.append(c)
    warnings = [
        f"job {c.job_id} run {c.record.run.text}: the old agent billed {c.billed_s} s, but "
        f"the floor is {c.from_s} s into the run: {c.from_s - c.billed_s} s are billed by "
        "neither agent (it had stopped reporting this run)"
        for c in unique
        if c.from_s > c.billed_s and c.record.elapsed_s > c.billed_s
    ]
    return Migration(
        floor_at=floor,
        window_start_at=window_start,
        carried=tuple(unique),
        problems=tuple(problems),
        unknown=tuple(unknown),
        skipped=tuple(skipped),
        ignored=ignored,
        warnings=tuple(warnings),
    )


def _carried(
    job_id: int, record: JobRecord, billed_s: int, floor: datetime, note: str = ""
) -> Carried:
    from_s = billed_s
    if record.start_at is not None:
        floor_s = int((floor - record.start_at).total_seconds())
        from_s = max(billed_s, min(floor_s, record.elapsed_s))
    return Carried(job_id, record, billed_s, from_s, note)


def _match(job: OldJob, runs: Sequence[JobRecord]) -> Any:
    """The run ``job`` describes, or why there is none ("unknown: ..." when only listed)."""
    at = job.reported_at
    state = "running" if job.running else f"completed at {utc_text(job.completed_at or at)}"
    said = f"the old agent billed {job.reported_s} s up to {utc_text(at)} ({state})"
    if not runs:
        return f"unknown: {said}, and slurmdbd returns no run of JobIDRaw {job.job_id}"
    slack = timedelta(seconds=SLACK_S)
    current = [
        r
        for r in runs
        if r.start_at is not None
        and r.start_at <= at + slack
        and (r.end_at is None or at <= r.end_at + slack)
    ]
    if len(current) > 1:  # the slack let in a run that ended (or began) just then
        strict = [r for r in current if _running_at(r, at)]
        current = strict or current
    listed = ", ".join(
        f"{r.run.text} (start {utc_text(r.start_at) if r.start_at else '-'}, "
        f"end {utc_text(r.end_at) if r.end_at else 'running'}, elapsed {r.elapsed_s} s)"
        for r in runs
    )
    if not current:
        return (
            f"{said}, but no run of JobIDRaw {job.job_id} was running then (slurmdbd has "
            f"{listed}): the old row may belong to an earlier job of the same id. Check it, "
            f"then run again with --skip {job.job_id}"
        )
    if len(current) > 1:
        return (
            f"ambiguous: {said}, and {len(current)} runs of JobIDRaw {job.job_id} were "
            f"running then ({listed}; several clusters?). Check which one it billed, then run "
            f"again with --skip {job.job_id}"
        )
    run = current[0]
    assert run.start_at is not None
    possible = int((min(at, run.end_at or at) - run.start_at).total_seconds()) + SLACK_S
    if job.reported_s > min(possible, run.elapsed_s + SLACK_S) and job.reported_s > 0:
        return (
            f"reused job id: {said}, but the run of JobIDRaw {job.job_id} running then "
            f"({run.run.text}, started {utc_text(run.start_at)}) had run at most "
            f"{max(0, min(possible - SLACK_S, run.elapsed_s))} s: the row mixes two jobs of "
            f"the same id (Slurm wraps job ids at MaxJobId). Nothing can be carried over for "
            f"it safely: check what the old agent billed for it, then run again with --skip "
            f"{job.job_id}"
        )
    return run


def _running_at(run: JobRecord, at: datetime) -> bool:
    start, end = run.start_at, run.end_at
    return start is not None and start <= at and (end is None or at <= end)


# ------------------------------------------------------------------------------ output


def _hours(record: JobRecord, seconds: int) -> Decimal:
    return (Decimal(record.tres.cpu) * seconds / 3600).quantize(Decimal("0.000001"))


def as_json(migration: Migration, written: bool) -> dict[str, Any]:
    return {
        "floor": utc_text(migration.floor_at),
        "written": written,
        "runs": [
            {
                "jobId": c.record.job_id,
                "oldJobId": c.job_id,
                "run": c.record.run.text,
                "billedSeconds": c.billed_s,
                "elapsedNow": c.record.elapsed_s,
                "final": c.record.final,
                "firstSyncFrom": c.from_s,
                "firstSyncSeconds": c.next_s,
                "firstSyncCoreHours": float(_hours(c.record, c.next_s)),
                "note": c.note,
            }
            for c in migration.carried
        ],
        "problems": list(migration.problems),
        "unknown": list(migration.unknown),
        "skipped": list(migration.skipped),
        "ignored": migration.ignored,
        "warnings": list(migration.warnings),
    }


def as_text(migration: Migration, written: bool, dry_run: bool) -> str:
    lines = [
        f"billing floor and high-water mark: {utc_text(migration.floor_at)} (the cutover); "
        f"{len(migration.carried)} run(s) carried over, {migration.ignored} old row(s) too "
        "old to matter"
    ]
    for c in migration.carried:
        what = (
            "nothing more (fully billed)"
            if c.next_s == 0 and c.record.final
            else f"elapsed {c.from_s}-{c.record.elapsed_s} s = {_hours(c.record, c.next_s)} "
            f"core-hours{' so far (running)' if not c.record.final else ''}"
        )
        lines.append(
            f"  job {c.record.job_id} run {c.record.run.text}: old agent billed {c.billed_s} s "
            f"({_hours(c.record, c.billed_s)} core-hours); the first sync bills {what}"
            + (f" [{c.note}]" if c.note else "")
        )
    lines += [f"  not found: {u}" for u in migration.unknown]
    lines += [f"  skipped: {s}" for s in migration.skipped]
    lines += [f"  warning: {w}" for w in migration.warnings]
    lines += [f"  problem: {p}" for p in migration.problems]
    if migration.problems:
        lines.append("nothing was written: fix the problems above first")
    elif written:
        lines.append(
            "recorded in the state file. Next: `slurm-tracker check --online`, "
            "`slurm-tracker sync --dry-run`, then start the new timer"
        )
    elif dry_run:
        lines.append("dry run: nothing was written")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ doing it


def migrate(
    config: Config,
    old_path: Path,
    state_path: Path,
    *,
    dry_run: bool,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
    skip: Iterable[int] = (),
) -> tuple[Migration, bool]:
    """Read the old state and slurmdbd, plan, and (unless ``dry_run`` or a problem stops it)
    record the progress, floor and mark in ONE transaction under the state lock. Returns the
    plan and whether it was written. The old state file is only read."""
    now_at = pipeline.utc_now()
    jobs = read_old_state(old_path, now_at)
    start = sacct_window_start(jobs, config.sacct.overlap_s)
    if start is None:
        raise StateError(f"old agent state {old_path} holds no job: there is nothing to migrate")
    used = _used(state_path)
    records, _ = reconcile.read_records(
        config,
        inputs.Window(start, now_at),
        sacct_file=sacct_file,
        stdin=stdin,
        environ=environ,
    )
    migration = plan(
        jobs,
        records,
        config.sacct.clusters or (config.cluster,),
        overlap_s=config.sacct.overlap_s,
        skip=skip,
        first_sync_start=config.sacct.first_sync_start,
    )
    if used:
        migration = replace(migration, problems=(*migration.problems, used))
    if dry_run or migration.problems:
        return migration, False
    note = {
        "from": str(old_path),
        "at": utc_text(now_at),
        "floor": utc_text(migration.floor_at),
        "runs": len(migration.carried),
    }
    with StateLock(state_path) as lock:
        lock.acquire(now_at)
        with State.open(state_path) as store:
            store.import_progress(
                [c.row() for c in migration.carried], migration.floor_at, note, now_at
            )
    return migration, True


def _used(state_path: Path) -> str:
    """Why the state file cannot take a migration ("" when it can: missing, or never used)."""
    with State.open(state_path, readonly=True) as store:
        found = [
            what
            for what, there in (
                ("a billing floor", store.floor_at() is not None),
                ("a high-water mark", store.high_water_at() is not None),
                ("a migration", store.migration() is not None),
                ("outbox rows", any(store.counts().values())),
            )
            if there
        ]
    if not found:
        return ""
    return (
        f"state file {state_path} has already been used ({', '.join(found)}): migrate into a "
        "new state file (--state), before its first sync"
    )
