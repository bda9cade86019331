"""Reading the report's input: live sacct in chunks (allocations with their steps), or a capture.

Live: one sacct call per chunk (``sacct.backfill_chunk``, a day by default) with the backfill
pause between chunks, each made by inputs.call_sacct as a sync's (a fresh random delimiter,
the allow-listed environment, the output spooled to a temporary file), framed strictly block
by block (parse.live_file_rows). A run read by several chunks (it spans their boundary) is
kept once, from the read that knows most of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, BinaryIO, Optional

from slurm_tracker import inputs
from slurm_tracker.config import Config
from slurm_tracker.costs.steps import RunUsage, Usage, runs_from_json, runs_from_rows
from slurm_tracker.errors import InputError, SacctUnavailable
from slurm_tracker.models import Rejected, RunKey
from slurm_tracker.parse import live_file_rows, parse_sacct, saved_rows

Progress = Callable[[int, int, inputs.Window], None]


def read_usage(
    config: Config,
    start_at: datetime,
    end_at: datetime,
    *,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
    with_job_name: bool,
    progress: Optional[Progress] = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Usage:
    """The runs (with what their steps used) of ``[start_at, end_at)`` and what was rejected."""
    if sacct_file is not None:
        data = inputs.read_saved(sacct_file, stdin)
        return read_saved_usage(data, config, source="stdin" if sacct_file == "-" else sacct_file)
    windows = inputs.chunks(start_at, end_at, config.sacct.backfill_chunk_s)
    found: dict[RunKey, RunUsage] = {}
    rejected: list[Rejected] = []
    orphans = 0
    for number, window in enumerate(windows):
        if number:
            sleep(config.sacct.backfill_pause_s)
        if progress is not None:
            progress(number + 1, len(windows), window)
        usage = _read_live(config, window, environ, with_job_name)
        rejected.extend(usage.rejected)
        orphans += usage.orphan_steps
        for run in usage.runs:
            key = run.record.run
            if key not in found or _knows_more(run, found[key]):
                found[key] = run
    return Usage(tuple(found.values()), tuple(rejected), orphans)


def _knows_more(new: RunUsage, old: RunUsage) -> bool:
    return (new.record.final, new.record.elapsed_s, new.steps) > (
        old.record.final,
        old.record.elapsed_s,
        old.steps,
    )


def _read_live(
    config: Config, window: inputs.Window, environ: Mapping[str, str], with_job_name: bool
) -> Usage:
    output = inputs.call_sacct(
        config, window, environ, with_job_name=with_job_name, with_steps=True
    )
    try:
        rows = live_file_rows(
            output.opener, delimiter=output.delimiter, fields=output.fields, source=output.source
        )
    except InputError as exc:
        raise SacctUnavailable(f"{exc}; nothing was reported, try again") from exc
    return runs_from_rows(rows, cluster=config.cluster, tz=inputs.file_zone(config.sacct))


def read_saved_usage(data: bytes, config: Config, *, source: str) -> Usage:
    """Runs of a saved capture: parsable with a header (steps included when the capture has
    them), or ``sacct --json`` (steps from each job's ``steps`` list)."""
    if data.lstrip().startswith(b"{"):
        parsed = parse_sacct(data, cluster=config.cluster, source=source)
        try:
            document: Any = json.loads(data)
        except (ValueError, RecursionError):  # parse_sacct already refused it
            document = {}
        jobs = document.get("jobs") if isinstance(document, dict) else None
        runs = runs_from_json(parsed.records, jobs if isinstance(jobs, list) else [])
        return Usage(tuple(runs), parsed.rejected)
    tz = inputs.file_zone(config.sacct)
    return runs_from_rows(saved_rows(data, source=source), cluster=config.cluster, tz=tz)
