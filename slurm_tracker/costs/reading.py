"""Reading the report's input: live sacct in chunks (allocations with their steps), or a capture.

Live: one sacct call per chunk (``sacct.backfill_chunk``, a day by default) with the backfill
pause between chunks, each with a fresh random delimiter and the allow-listed environment
(sacct.py), framed strictly (parse.live_rows). A run read by several chunks (it spans their
boundary) is kept once, from the read that knows most of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, BinaryIO, Optional

from slurm_tracker import pipeline, sacct
from slurm_tracker.config import Config
from slurm_tracker.costs.steps import RunUsage, Usage, runs_from_json, runs_from_rows
from slurm_tracker.errors import InputError, SacctUnavailable
from slurm_tracker.models import Rejected, RunKey
from slurm_tracker.parse import live_rows, parse_sacct, saved_rows

log = logging.getLogger(__name__)

Progress = Callable[[int, int, pipeline.Window], None]


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
        data = pipeline.read_saved(sacct_file, stdin)
        return read_saved_usage(data, config, source="stdin" if sacct_file == "-" else sacct_file)
    windows = pipeline.chunks(start_at, end_at, config.sacct.backfill_chunk_s)
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
    config: Config, window: pipeline.Window, environ: Mapping[str, str], with_job_name: bool
) -> Usage:
    delimiter = sacct.new_delimiter()
    fields = sacct.report_fields(with_job_name)
    argv = sacct.build_report_command(
        config.sacct.path,
        window.start_at,
        window.end_at,
        config.sacct.extra_args,
        delimiter=delimiter,
        fields=fields,
        clusters=config.sacct.clusters,
    )
    log.info("running sacct (with steps) for %s .. %s", window.start_at, window.end_at)
    data = sacct.run_sacct(
        argv, timeout_s=config.sacct.timeout_s, environ=sacct.sacct_environment(environ)
    )
    source = f"sacct ({config.sacct.path})"
    try:
        rows = list(live_rows(data, delimiter=delimiter, fields=fields, source=source))
    except InputError as exc:
        raise SacctUnavailable(f"{exc}; nothing was reported, try again") from exc
    return runs_from_rows(rows, cluster=config.cluster, tz=pipeline.file_zone(config.sacct))


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
    tz = pipeline.file_zone(config.sacct)
    return runs_from_rows(saved_rows(data, source=source), cluster=config.cluster, tz=tz)
