"""`sync` and `backfill`: plan the usage not yet reported and post it; a live run's outcome is
recorded whatever happens (health.py), and its summary decides the exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Optional

import click

from slurm_tracker import api, correcting, health, ledger, logs, metrics, pipeline, report
from slurm_tracker import backfill as backfilling
from slurm_tracker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNDELIVERED,
    TEMPORARY_ERRNOS,
    F,
    api_client,
    config_from,
    config_option,
    emit,
    exit_code,
    handles_errors,
    log_options,
    main,
    one_line,
    parse_time,
    rows_format_option,
    setup_logging,
    state_option,
    state_path_of,
)
from slurm_tracker.cli.plan_view import show_plan
from slurm_tracker.config import Config, parse_duration
from slurm_tracker.errors import TrackerError
from slurm_tracker.output import OutputFormat, View
from slurm_tracker.state import State, StateLock
from slurm_tracker.times import utc_text


def _fields(sacct_fields: Optional[str]) -> Optional[list[str]]:
    return [f.strip() for f in sacct_fields.split(",") if f.strip()] if sacct_fields else None


def _input_options(func: F) -> F:
    """The options of a sync: which state, which input, which clock, which output."""
    options = [
        state_option,
        click.option(
            "--sacct-file",
            metavar="PATH",
            help="Read saved sacct output (parsable with a header, or --json; '-' for stdin) "
            "instead of running sacct.",
        ),
        click.option(
            "--sacct-fields",
            metavar="LIST",
            help="Field list of a saved parsable file that has no header line.",
        ),
        click.option(
            "--now",
            "now_at",
            metavar="RFC3339",
            callback=parse_time,
            help="Pin the clock (tests, replays).",
        ),
        rows_format_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Plan and show; write no state, send nothing.")
@click.option(
    "--take-over",
    is_flag=True,
    help="Another agent's events on the API are counted as billed instead of stopping this "
    "sync (exit 5): only when that agent is stopped for good and this one replaces it.",
)
@_input_options
@log_options
@handles_errors
def sync(
    config_path: Optional[str],
    dry_run: bool,
    take_over: bool,
    state_path: Optional[str],
    sacct_file: Optional[str],
    sacct_fields: Optional[str],
    now_at: Optional[datetime],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Read job accounting, plan the usage not yet reported, and post it.

    Run it from cron or a systemd timer every few minutes. With --dry-run it shows what
    would be posted and what it costs, from the state as it is, and changes nothing.
    Exit 0 when everything was delivered, 4 when events wait (pending, held or dead), 75 when
    sacct or the API is unavailable (the next run goes on), 3 for a config or state problem.

    \b
    Examples:
      slurm-tracker sync --dry-run
      slurm-tracker sync --dry-run -v --output csv > next-sync.csv
      slurm-tracker sync -q --syslog
      slurm-tracker sync --dry-run --sacct-file capture.txt --now 2026-11-30T12:00:00Z
    """
    setup_logging(verbose, quiet)
    if now_at is not None and not (dry_run or sacct_file):
        raise click.UsageError(
            "--now pins the clock for dry runs and replays of saved files only (--dry-run or "
            "--sacct-file): a live sync always runs at the real time, so that the high-water "
            "mark cannot move past it"
        )
    config = config_from(config_path)
    now_at = now_at or pipeline.utc_now()
    catalog = pipeline.load_catalog(config)
    path = state_path_of(config, state_path)
    stdin = sys.stdin.buffer
    if dry_run:
        with State.open(path, readonly=True) as store:
            run = pipeline.dry_run(
                config,
                store,
                catalog,
                now_at=now_at,
                sacct_file=sacct_file,
                fields=_fields(sacct_fields),
                stdin=stdin,
                environ=os.environ,
                agent=ledger.agent_id(path),
            )
            show_plan(run.plans, run.window, run.source, output, verbose)
        return
    request = pipeline.SyncRequest(
        now_at, sacct_file, _fields(sacct_fields), stdin, os.environ, take_over
    )

    def work(store: State, client: api.AllocationsClient) -> pipeline.SyncResult:
        result = pipeline.sync_once(config, store, client, catalog, request)
        return correcting.after_sync(config, store, client, catalog, result)

    _finish(_recorded_sync(config, path, "sync", work, now_at), output)


def _recorded_sync(
    config: Config,
    path: Path,
    kind: str,
    work: Callable[[State, api.AllocationsClient], pipeline.SyncResult],
    lock_at: datetime,
) -> pipeline.SyncResult:
    """A live sync (or backfill: ``kind``) whose outcome is recorded whatever happens (see
    health.py): in the state when it is open under our lock, else, for a sync, in
    ``<state>.last-failure``; the metrics file is written after it whenever the state is open;
    one summary line is logged. The original error passes through unchanged.
    """
    started_at = pipeline.utc_now()
    recorded = False
    try:
        client = api_client(config)
        with StateLock(path) as lock:
            lock.acquire(lock_at)
            with State.open(path) as store:
                try:
                    result = work(store, client)
                except BaseException as exc:
                    recorded = True
                    _record_failure(store, path, started_at, exc, kind)
                    raise
                finally:
                    _write_metrics(config, store)
    except BaseException as exc:
        if not recorded:
            _record_failure(None, path, started_at, exc, kind)
        raise
    if result.outcome in health.SUCCESS_OUTCOMES and kind == "sync":
        health.clear_failure_trace(path)
    logs.summary(
        *report.sync_summary(result, kind, (pipeline.utc_now() - started_at).total_seconds())
    )
    return result


def _record_failure(
    store: Optional[State], path: Path, started_at: datetime, exc: BaseException, kind: str
) -> None:
    """Record a failed sync or backfill (never raising, never changing ``exc``)."""
    code, reason = failure_of(exc)
    if code is None:
        return
    try:
        health.record_failed_sync(store, path, started_at, code, reason, kind)
    except Exception as problem:  # recording must never mask the sync's own error
        logging.getLogger("slurm_tracker").warning("could not record the failed sync: %s", problem)


def failure_of(exc: BaseException) -> tuple[Optional[int], str]:
    """The exit code handles_errors gives ``exc`` and its one-line reason; (None, "") for an
    interruption that is no sync outcome (Ctrl-C, a click usage error)."""
    if isinstance(exc, (KeyboardInterrupt, click.exceptions.ClickException)):
        return None, ""
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILURE
        return (code, "exited") if code else (None, "")
    reason = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, TrackerError):
        return exit_code(exc), reason
    if isinstance(exc, OSError):
        return (EXIT_TEMPFAIL if exc.errno in TEMPORARY_ERRNOS else EXIT_FAILURE), reason
    return EXIT_FAILURE, reason


def _write_metrics(config: Config, store: Optional[State]) -> None:
    """The metrics file after a sync, when configured and the state is open (best effort)."""
    target = config.monitoring.metrics_file
    if target is None or store is None:
        return
    try:
        metrics.write_metrics(target, store, pipeline.utc_now())
    except Exception as problem:  # never mask the sync's outcome
        logging.getLogger("slurm_tracker").warning("could not write the metrics: %s", problem)


def _finish(result: pipeline.SyncResult, output: OutputFormat) -> None:
    """Print a sync's summary and exit with the code its outcome calls for."""
    emit(output, View(lambda: report.sync_text(result), data=lambda: report.sync_json(result)))
    code = {
        "ok": EXIT_OK,
        "undelivered": EXIT_UNDELIVERED,
        "unavailable": EXIT_TEMPFAIL,
        "auth": EXIT_FAILURE,
    }[result.outcome]
    if result.outcome == "auth":
        click.echo(f"slurm-tracker: error: {result.delivery.auth_error}", err=True)
    elif result.outcome == "unavailable":
        click.echo(
            f"slurm-tracker: error: {result.delivery.unavailable} "
            "(temporary: the next run will try again)",
            err=True,
        )
    sys.exit(code)


@main.command()
@config_option
@click.option(
    "--start",
    "start",
    required=True,
    metavar="DATE",
    callback=parse_time,
    help="First day (or RFC 3339 time) to load, UTC.",
)
@click.option(
    "--end",
    "end",
    metavar="DATE",
    callback=parse_time,
    help="End (exclusive) of the period, UTC (default and latest: now minus sacct.lag).",
)
@click.option(
    "--chunk",
    default=None,
    metavar="DURATION",
    help="One sacct call per chunk (default: sacct.backfill_chunk, 1d).",
)
@click.option("--dry-run", is_flag=True, help="Plan and show; write no state, send nothing.")
@click.option(
    "--sacct-file",
    metavar="PATH",
    help="Plan a saved sacct capture of the period ('-' for stdin; its runs that ran in "
    "[START, END)) instead of running sacct, e.g. with --dry-run on a machine without Slurm.",
)
@state_option
@rows_format_option
@log_options
@handles_errors
def backfill(
    config_path: Optional[str],
    start: datetime,
    end: Optional[datetime],
    chunk: Optional[str],
    dry_run: bool,
    sacct_file: Optional[str],
    state_path: Optional[str],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Load history: one sacct call per chunk of [START, END), with a pause between chunks.

    Usage already reported (by syncs or an earlier backfill) is not reported again; the
    high-water mark of the regular sync is left alone. Each chunk is committed and delivered
    before the next is read, with a progress bar on a terminal (else one line per chunk with
    an ETA). A backfill that was killed or stopped goes on from its next unfinished chunk when
    run again with the same --start and --chunk.

    \b
    Examples:
      slurm-tracker backfill --start 2026-01-01 --dry-run
      slurm-tracker backfill --start 2026-01-01 --end 2026-07-01 --chunk 12h
      slurm-tracker backfill --start 2026-01-01 --end 2026-02-01 --dry-run --sacct-file jan.txt
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    now_at = pipeline.utc_now()
    latest = backfilling.capped_end(now_at, now_at, config.sacct.lag_s)
    if end is None or (end > latest and sacct_file is None):
        if end is not None:
            logging.getLogger("slurm_tracker").warning(
                "--end capped at now minus sacct.lag, %s: slurmdbd may not have the rest yet, "
                "and the regular sync bills it",
                f"{utc_text(latest)}",
            )
        end = latest
    if end <= start:
        raise click.BadParameter(
            f"--end must be after --start (the period ends {utc_text(end)})",
            param_hint="--end",
        )
    try:
        chunk_s = parse_duration(chunk) if chunk else config.sacct.backfill_chunk_s
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--chunk") from exc
    catalog = pipeline.load_catalog(config)
    path = state_path_of(config, state_path)
    period = backfilling.Period(start, end, chunk_s)
    saved = None
    if sacct_file is not None:
        source = "stdin" if sacct_file == "-" else sacct_file
        saved = pipeline.Input(pipeline.read_saved(sacct_file, sys.stdin.buffer), source, None)
    chunks = 1 if saved else len(period.windows())
    if dry_run:
        source = saved.source if saved else f"sacct ({config.sacct.path})"
        with State.open(path, readonly=True) as store, _progress(chunks, quiet) as shown:
            plans = backfilling.preview(
                config, store, catalog, period, os.environ, saved=saved, progress=shown
            )
            show_plan(plans, pipeline.Window(start, end), source, output, verbose)
        return

    def work(store: State, client: api.AllocationsClient) -> pipeline.SyncResult:
        with _progress(chunks, quiet) as shown:
            return backfilling.run(
                config, store, client, catalog, period, os.environ, saved=saved, progress=shown
            )

    _finish(_recorded_sync(config, path, "backfill", work, now_at), output)


@contextlib.contextmanager
def _progress(total: int, quiet: bool) -> Iterator[backfilling.Progress]:
    """Backfill progress on stderr: a bar on a terminal, else one line per chunk with an ETA
    (also logged at INFO); nothing with -q."""
    eta = backfilling.Eta()
    log = logging.getLogger("slurm_tracker.backfill")
    if quiet or not sys.stderr.isatty():

        def show_line(chunk: backfilling.Chunk) -> None:
            line = eta.line(chunk)
            log.info("%s", line)
            if not quiet:
                click.echo(line, err=True)

        yield show_line
        return
    with click.progressbar(
        length=total, label="backfill", file=sys.stderr, show_pos=True, show_eta=True
    ) as bar:

        def show_bar(chunk: backfilling.Chunk) -> None:
            log.info("%s", eta.line(chunk))
            bar.update(1)

        yield show_bar
