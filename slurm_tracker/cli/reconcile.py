"""`reconcile` (slurmdbd against the API's record, and its repair) and `corrections` (runs
slurmdbd now says used less than was billed)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Optional

import click

from slurm_tracker import correcting, delivery, pipeline
from slurm_tracker import reconcile as reconciling
from slurm_tracker.cli.common import (
    EXIT_DISCREPANCIES,
    EXIT_OK,
    EXIT_UNDELIVERED,
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


@main.command("reconcile")
@config_option
@click.option(
    "--start",
    required=True,
    metavar="TIME",
    callback=parse_time,
    help="Start of the window (a date or RFC 3339 time, UTC).",
)
@click.option(
    "--end", required=True, metavar="TIME", callback=parse_time, help="End (exclusive), UTC."
)
@click.option(
    "--repair",
    is_flag=True,
    help="Also show the repair: delete duplicates and overlaps, post what is missing.",
)
@click.option("--yes", is_flag=True, help="With --repair: do it (every change logged and shown).")
@state_option
@click.option(
    "--sacct-file",
    metavar="PATH",
    help="Judge a saved sacct capture ('-' for stdin) instead of running sacct.",
)
@format_option
@log_options
@handles_errors
def reconcile_command(
    config_path: Optional[str],
    start: datetime,
    end: datetime,
    repair: bool,
    yes: bool,
    state_path: Optional[str],
    sacct_file: Optional[str],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Compare what slurmdbd says for [START, END) with what the API holds as billed.

    Reports per run and SKU: missing usage, duplicate keys, overlapping stretches, over-billing,
    events of runs slurmdbd does not know, misrouted events and events of other agents. Exit 0
    when nothing is found, 6 when discrepancies are. With --repair --yes (under the state
    lock): deletes duplicates and overlaps, posts the missing stretches through the outbox,
    then reads the API again.

    \b
    Examples:
      slurm-tracker reconcile --start 2026-11-01 --end 2026-12-01
      slurm-tracker reconcile --start 2026-11-01 --end 2026-12-01 --repair
      slurm-tracker reconcile --start 2026-11-01 --end 2026-12-01 --repair --yes
    """
    setup_logging(verbose, quiet)
    if yes and not repair:
        raise click.UsageError("--yes only goes with --repair")
    if end <= start:
        raise click.BadParameter("--end must be after --start", param_hint="--end")
    config = config_from(config_path)
    catalog = pipeline.load_catalog(config)
    path = state_path_of(config, state_path)
    window = pipeline.Window(start, end)
    client = api_client(config)
    records, _ = reconciling.read_records(
        config, window, sacct_file=sacct_file, stdin=sys.stdin.buffer, environ=os.environ
    )
    if not yes:
        with State.open(path, readonly=True) as store:
            found = reconciling.examine(config, store, client, records, window, catalog)
            outbox = reconciling.outbox_status(store)
        fix = reconciling.plan_repair(found, outbox)
        _show_reconcile(output, found, fix if repair else None)
        waiting = sum(1 for s in outbox.values() if s in reconciling.UNSETTLED)
        if waiting:
            click.echo(
                f"slurm-tracker: note: {waiting} events of the outbox are not on the API yet "
                "(see `slurm-tracker outbox list`): their usage may show as missing",
                err=True,
            )
        sys.exit(EXIT_DISCREPANCIES if found.discrepancies else EXIT_OK)
    with StateLock(path) as lock:
        lock.acquire(pipeline.utc_now())
        with State.open(path) as store:
            # what is waiting goes out first: the repair must not post what the outbox holds
            delivery.deliver_outbox(store, client, pipeline.utc_now, config.api.concurrency)
            found = reconciling.examine(config, store, client, records, window, catalog)
            fix = reconciling.plan_repair(found, reconciling.outbox_status(store))
            applied = reconciling.apply_repair(fix, config, store, client, pipeline.utc_now())
            after = reconciling.examine(config, store, client, records, window, catalog)
    _show_reconcile(output, found, fix, applied, after)
    if applied.undelivered:
        sys.exit(EXIT_UNDELIVERED)
    sys.exit(EXIT_DISCREPANCIES if after.discrepancies else EXIT_OK)


def _show_reconcile(
    output: OutputFormat,
    found: reconciling.Report,
    fix: Optional[reconciling.Repair],
    applied: Optional[reconciling.Applied] = None,
    after: Optional[reconciling.Report] = None,
) -> None:
    emit(
        output,
        View(
            lambda: reconciling.as_text(found, fix, applied, after),
            data=lambda: reconciling.as_json(found, fix, applied, after),
            json_default=None,
        ),
    )


@main.group("corrections")
def corrections_group() -> None:
    """Runs slurmdbd now says used less than was billed (e.g. runaway jobs an admin fixed).

    A sync or backfill that reads a final run whose ElapsedRaw is below the seconds already
    billed records a correction instead of billing. Nothing changes on the API unless asked:
    `corrections apply --yes`, or `corrections: {apply: true}` in the config (each sync then
    applies the open ones after delivering).
    """


@corrections_group.command("list")
@config_option
@state_option
@click.option("--all", "all_", is_flag=True, help="Applied and dismissed ones too.")
@rows_format_option
@log_options
@handles_errors
def corrections_list(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """List corrections (the open ones unless --all), oldest first.

    \b
    Examples:
      slurm-tracker corrections list
      slurm-tracker corrections list --all --output csv
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    with State.open(state_path_of(config, state_path), readonly=True) as store:
        rows = store.corrections(include_closed=all_)
    emit(
        output,
        View(
            lambda: correcting.list_text(rows), data=lambda: [correcting.row_json(r) for r in rows]
        ),
    )


@corrections_group.command("apply")
@config_option
@state_option
@click.option("--yes", is_flag=True, help="Do it (without it, only show what it would do).")
@click.argument("runs", nargs=-1, metavar="[RUN|JOBID]...")
@format_option
@log_options
@handles_errors
def corrections_apply(
    config_path: Optional[str],
    state_path: Optional[str],
    yes: bool,
    runs: tuple[str, ...],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Correct the API's record of the open corrections (or of the runs named).

    For each run: its events on the API (our keys for this run only) whose stretch reaches
    beyond slurmdbd's seconds are deleted, and their valid part is posted again through the
    outbox (exactly once); then the run's progress is set to slurmdbd's seconds and the
    correction is marked applied. Without --yes it reads the API and shows what it would do.
    Exit 0 when every correction tried was applied, 4 when some stay open (the reason is
    shown; the next apply goes on from there).

    \b
    Examples:
      slurm-tracker corrections apply
      slurm-tracker corrections apply --yes 1234
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    catalog = pipeline.load_catalog(config)
    path = state_path_of(config, state_path)
    client = api_client(config)
    if not yes:
        with State.open(path, readonly=True) as store:
            attempts = [
                correcting.preview(row, config, store, client, catalog)
                for row in store.corrections()
                if not runs or row.run in runs or row.job_id in runs
            ]
    else:
        with StateLock(path) as lock:
            lock.acquire(pipeline.utc_now())
            with State.open(path) as store:
                # what is waiting goes out first: a run with unsettled events is not corrected
                delivery.deliver_outbox(store, client, pipeline.utc_now, config.api.concurrency)
                attempts = correcting.apply_open(config, store, client, catalog, runs)
    emit(
        output,
        View(
            lambda: correcting.attempts_text(attempts, yes),
            data=lambda: correcting.attempts_json(attempts, yes),
            json_default=None,
        ),
    )
    if yes and any(a.status == "open" for a in attempts):
        sys.exit(EXIT_UNDELIVERED)


@corrections_group.command("dismiss")
@config_option
@state_option
@click.argument("runs", nargs=-1, required=True, metavar="RUN|JOBID...")
@click.option("--reason", default="", help="Why (kept with the correction).")
@format_option
@log_options
@handles_errors
def corrections_dismiss(
    config_path: Optional[str],
    state_path: Optional[str],
    runs: tuple[str, ...],
    reason: str,
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Leave the API's record of these runs as it is: their open corrections are dismissed.

    A correction whose apply already deleted events cannot be dismissed: apply it.

    \b
    Examples:
      slurm-tracker corrections dismiss 1234 --reason "billed as agreed with the PI"
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    path = state_path_of(config, state_path)
    now_at = pipeline.utc_now()
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            chosen = [r.run for r in store.corrections() if r.run in runs or r.job_id in runs]
            count = store.dismiss_corrections(
                chosen, reason or "dismissed by an operator (`corrections dismiss`)", now_at
            )
    emit(
        output,
        View(
            lambda: f"{count} correction{'s' if count != 1 else ''} dismissed",
            data=lambda: {"dismissed": count},
        ),
    )
