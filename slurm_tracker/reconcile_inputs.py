"""What a reconcile reads: the runs slurmdbd returns for the window (live, chunk by chunk as a
backfill reads, or a saved capture), the API's events of this cluster, and the outbox."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import BinaryIO, Optional

from slurm_tracker import catalog_admin, inputs, ledger, planning
from slurm_tracker.config import Config
from slurm_tracker.ledger import BilledEvent
from slurm_tracker.models import JobRecord
from slurm_tracker.state import State

log = logging.getLogger("slurm_tracker.reconcile")  # the name its logs have always carried


def read_records(
    config: Config,
    window: inputs.Window,
    *,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[JobRecord], int]:
    """The runs slurmdbd returns for ``window`` (one record each) and how many records were
    rejected: live, one sacct call per chunk (sacct.backfill_chunk) with a pause between
    chunks, as backfill reads; or a saved capture, of which only runs overlapping the window
    are kept."""
    latest: list[JobRecord] = []
    rejected = 0
    if sacct_file is not None:
        given = inputs.gather(config, window, sacct_file, stdin, environ)
        parsed = inputs.parse_input(config, given, None)
        latest, rejected = list(parsed.records), len(parsed.rejected)
    else:
        chunks = inputs.chunks(window.start_at, window.end_at, config.sacct.backfill_chunk_s)
        for number, chunk in enumerate(chunks):
            if number:
                sleep(config.sacct.backfill_pause_s)
            log.info("reconcile chunk %d/%d", number + 1, len(chunks))
            parsed = inputs.parse_input(config, inputs.read_live(config, chunk, environ), None)
            latest, _ = planning.latest_records([*latest, *parsed.records])
            rejected += len(parsed.rejected)
    latest, _ = planning.latest_records(latest)
    return [r for r in latest if _overlaps(r, window)], rejected


def _overlaps(record: JobRecord, window: inputs.Window) -> bool:
    """Whether sacct -S -E would return the run for the window (it ran inside it)."""
    start, end = record.start_at, record.end_at
    return start is not None and start < window.end_at and (end is None or end >= window.start_at)


def read_since(records: Sequence[JobRecord], window: inputs.Window) -> datetime:
    """From when the API's events are read (by endedAt): every event of a run ends after the
    run's start, so the earliest start of the runs judged (or the window's start) is enough."""
    starts = [r.start_at for r in records if r.start_at is not None]
    return min([window.start_at, *starts])


def read_billed(client: ledger.UsageLister, config: Config, since: datetime) -> list[BilledEvent]:
    """Our events of our clusters on the mapped allocations that ended at ``since`` or later
    (each once, even when paging showed an item twice)."""
    allocations = catalog_admin.mapped_allocations(config)
    found: dict[str, BilledEvent] = {}
    unnamed: list[BilledEvent] = []
    for cluster in config.sacct.clusters or (config.cluster,):
        for event in ledger.billed_events(client, allocations, cluster, ended_from=since):
            if event.cost_id:
                found[event.cost_id] = event
            else:
                unnamed.append(event)
    return [*found.values(), *unnamed]


def outbox_status(store: State) -> dict[str, str]:
    """Every event key of the state's outbox, with its status (acknowledged events are kept
    about an hour: State.prune)."""
    return store.outbox_statuses()
