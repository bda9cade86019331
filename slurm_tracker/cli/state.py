"""`quarantine` (records never billed as they are) and `state` (repair the state file: rebuild
it from the API, move the high-water mark)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional

import click

from slurm_tracker import pipeline, report
from slurm_tracker.cli.common import (
    api_client,
    config_from,
    config_option,
    emit,
    format_option,
    handles_errors,
    log_options,
    main,
    parse_time,
    rows_format_option,
    setup_logging,
    state_option,
    state_path_of,
)
from slurm_tracker.output import OutputFormat, View
from slurm_tracker.state import State, StateLock
from slurm_tracker.times import utc_text


@main.group()
def quarantine() -> None:
    """Records that were rejected (malformed or implausible) and never billed."""


@quarantine.command("list")
@config_option
@state_option
@click.option("--all", "all_", is_flag=True, help="Resolved entries too.")
@rows_format_option
@log_options
@handles_errors
def quarantine_list(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """List quarantined records, oldest first.

    A record lands here when it cannot be billed as it is (a corrupt field, End before Start,
    a count above the limits...). It is never billed in that form. When slurmdbd later shows a
    sane record of the same run (after `sacctmgr` fixed it, say), the next sync or backfill
    that reads it bills it as usual and the entry is marked resolved. With -v: whole reasons
    and the records as read.

    \b
    Examples:
      slurm-tracker quarantine list
      slurm-tracker quarantine list --all -v
      slurm-tracker quarantine list --output csv > quarantine.csv
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    with State.open(state_path_of(config, state_path), readonly=True) as store:
        rows = store.quarantine_rows(include_resolved=all_)
    emit(
        output,
        View(
            lambda: report.quarantine_text(rows, verbose > 0),
            data=lambda: [report.quarantine_json(r) for r in rows],
        ),
    )


@main.group("state")
def state_group() -> None:
    """Repair the state file."""


@state_group.command("rebuild")
@config_option
@state_option
@click.option(
    "--from-api",
    "from_api",
    is_flag=True,
    required=True,
    help="Learn from the API's events what is already billed (the only source there is).",
)
@click.option(
    "--start",
    "start",
    metavar="TIME",
    callback=parse_time,
    help="Read the events that ended since then (default: a day before the billing floor, "
    "or the last 30 days).",
)
@click.option("--take-over", is_flag=True, help="Count another agent's events as billed too.")
@format_option
@log_options
@handles_errors
def state_rebuild(
    config_path: Optional[str],
    state_path: Optional[str],
    from_api: bool,
    start: Optional[datetime],
    take_over: bool,
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Bring the state file in line with what the API holds, instead of billing again.

    Every event of this cluster on the mapped allocations that the state file does not know
    (it was lost, replaced, or restored from an old backup) is counted as billed. A sync does
    the same by itself for a new state file and for events created since its last sync; use
    this to reach further back.

    \b
    Examples:
      slurm-tracker state rebuild --from-api
      slurm-tracker state rebuild --from-api --start 2026-01-01
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    path = state_path_of(config, state_path)
    now_at = pipeline.utc_now()
    client = api_client(config)
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            floor = pipeline.billing_floor(store, config)
            since = start or (floor - timedelta(days=1) if floor else now_at - timedelta(days=30))
            found = pipeline.compare_with_api(
                config, store, client, since, take_over=take_over, relearn=True
            )
    emit(
        output,
        View(
            lambda: (
                f"{found.read} events of cluster {config.cluster} on the API ended since "
                f"{utc_text(since)}; {found.adopted} were unknown to {path} and are now "
                "counted as billed"
            ),
            data=lambda: {"since": since.isoformat(), "read": found.read, "adopted": found.adopted},
        ),
    )


@state_group.command("set-mark")
@config_option
@state_option
@click.argument("time", metavar="TIME", callback=parse_time)
@click.option("--yes", is_flag=True, help="Do it (without it, only say what would change).")
@format_option
@log_options
@handles_errors
def state_set_mark(
    config_path: Optional[str],
    state_path: Optional[str],
    time: datetime,
    yes: bool,
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Set the high-water mark to TIME (RFC 3339), e.g. after a wrong clock moved it ahead.

    The next sync reads from TIME minus sacct.overlap. Moving the mark back bills nothing twice
    (every run's progress is kept), as long as TIME is after the point where old progress was
    pruned (refused otherwise).

    \b
    Examples:
      slurm-tracker state set-mark 2026-11-30T08:00:00Z
      slurm-tracker state set-mark 2026-11-30T08:00:00Z --yes
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    path = state_path_of(config, state_path)
    now_at = pipeline.utc_now()
    if not yes:
        with State.open(path, readonly=True) as store:
            mark = store.high_water_at()
        old = utc_text(mark) if mark else "none"
        emit(
            output,
            View(
                lambda: (
                    f"would set the high-water mark of {path} from {old} to "
                    f"{utc_text(time)}; pass --yes to do it"
                ),
                data=lambda: {"changed": False, "from": mark, "to": time},
            ),
        )
        return
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            previous = store.set_high_water(time, now_at, overlap_s=config.sacct.overlap_s)
    old = utc_text(previous) if previous else "none"
    emit(
        output,
        View(
            lambda: f"high-water mark of {path}: {old} -> {utc_text(time)}",
            data=lambda: {"changed": True, "from": previous, "to": time},
        ),
    )
