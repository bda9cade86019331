"""Command-line interface. The only module that prints and chooses exit codes.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 3 invalid configuration or state file
(or an unsafe file, or a high-water mark in the future); 4 some events dead-lettered, held or
still pending; 5 another agent bills this cluster; 6 reconcile found discrepancies; 75 temporary
failure (cron: just try again).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, TypeVar, Union, cast

import click
from dateutil import parser as dateparser

from slurm_tracker import (
    __version__,
    api,
    correcting,
    delivery,
    health,
    ledger,
    logs,
    manual,
    metrics,
    pipeline,
    rating,
    replan,
    report,
)
from slurm_tracker import backfill as backfilling
from slurm_tracker import reconcile as reconciling
from slurm_tracker.config import Config, load_config, parse_duration, resolve_config_path
from slurm_tracker.errors import (
    ConfigError,
    InputError,
    StateError,
    TemporaryFailure,
    TrackerError,
    UnsafeFile,
    WriterConflict,
)
from slurm_tracker.files import write_atomically
from slurm_tracker.state import State, StateLock

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNDELIVERED = 4
EXIT_WRITER_CONFLICT = 5  # another agent bills this cluster
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL from sysexits.h

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Logging for this command: -v/-q, and --log-format/--syslog kept by _log_options."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    logs.setup(
        verbose,
        quiet,
        log_format=meta.get("slurm_tracker.log_format"),
        syslog=bool(meta.get("slurm_tracker.syslog")),
    )


def _fail(message: str, code: int) -> None:
    logs.failure(message, code)
    sys.exit(code)


#: OS errors of the environment rather than of the input: full disk or quota, read-only file
#: system, I/O error. Nothing is lost; the next run continues where this one stopped.
_TEMPORARY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def handles_errors(func: F) -> F:
    """Turns errors into one message on stderr and the documented exit code, never a traceback.

    A last-resort handler turns anything unexpected into exit 1 with one line; the details
    (the traceback) are logged at debug level (-vv).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TrackerError as exc:
            code = _exit_code(exc)
            temporary = " (temporary: the next run will try again)" if code == EXIT_TEMPFAIL else ""
            _fail(f"{exc}{temporary}", code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            if exc.errno in _TEMPORARY_ERRNOS:
                _fail(
                    f"{exc.strerror or exc}{where}: nothing was lost (temporary: the next run "
                    "will try again once this is fixed)",
                    EXIT_TEMPFAIL,
                )
            _log_unexpected(exc)
            _fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
        except Exception as exc:
            _log_unexpected(exc)
            _fail(
                f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (run again with -vv "
                "for the details, and please report it)",
                EXIT_FAILURE,
            )
        return None

    return cast(F, wrapper)


def _exit_code(exc: TrackerError) -> int:
    """The documented exit code of a domain error (one table for messages and records)."""
    if isinstance(exc, (ConfigError, StateError, UnsafeFile)):
        return EXIT_CONFIG
    if isinstance(exc, WriterConflict):
        return EXIT_WRITER_CONFLICT
    if isinstance(exc, TemporaryFailure):
        return EXIT_TEMPFAIL
    if isinstance(exc, InputError):
        return EXIT_USAGE
    return EXIT_FAILURE


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 200 else line[:200] + "..."


def _log_unexpected(exc: BaseException) -> None:
    logging.getLogger("slurm_tracker").debug("details", exc_info=exc)


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """Keep a logging option for _setup_logging (not passed to the command function)."""
    ctx.meta[f"slurm_tracker.{param.name}"] = value
    return value


def _log_options(func: F) -> F:
    """-v/-q, --log-format and --syslog (see logs.py)."""
    func = click.option(
        "--syslog",
        is_flag=True,
        expose_value=False,
        callback=_remember,
        help="Also log to the local syslog (INFO and up, whatever -q says), e.g. from cron. "
        "Env: SLURM_TRACKER_SYSLOG=1.",
    )(func)
    func = click.option(
        "--log-format",
        type=click.Choice(logs.FORMATS),
        default=None,
        expose_value=False,
        callback=_remember,
        help="Log lines on stderr as text (default) or one JSON object per line. "
        "Env: SLURM_TRACKER_LOG_FORMAT.",
    )(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")(func)
    return click.option(
        "-v",
        "--verbose",
        count=True,
        help="More detail: -v per-event lines and INFO logs, -vv DEBUG.",
    )(func)


def _config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        metavar="PATH",
        help="Config file (default: $SLURM_TRACKER_CONFIG, else /etc/slurm-tracker/config.yaml).",
    )(func)


_state_option = click.option(
    "--state", "state_path", metavar="PATH", help="State file (default: from the config)."
)
_output_option = click.option(
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="For people (table) or programs (json).",
)
_rows_output_option = click.option(
    "--output",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="For people (table) or programs (json; csv: one row per item, nested fields as "
    "dotted columns).",
)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _emit(output: str, data: Any, text: Callable[[], str]) -> None:
    """Print ``data`` as JSON or CSV (a list: one row per item), else ``text()``."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, default=_jsonable))
    elif output == "csv":
        click.echo(report.csv_text(data if isinstance(data, list) else [data]), nl=False)
    else:
        click.echo(text())


def _parse_now(
    _ctx: click.Context, _param: click.Parameter, value: Optional[str]
) -> Optional[datetime]:
    if value is None:
        return None
    try:
        parsed = dateparser.isoparse(value)
    except (ValueError, OverflowError) as exc:
        raise click.BadParameter(
            f"{value!r} is not an RFC 3339 time, e.g. 2026-05-01T12:00:00Z"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _load(config_path: Optional[str]) -> Config:
    return load_config(resolve_config_path(config_path, os.environ))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slurm-tracker")
def main() -> None:
    """Bill Slurm job usage to the Allocations API, exactly once.

    Run `slurm-tracker sync` from cron or a systemd timer every few minutes;
    `slurm-tracker sync --dry-run` shows what would be sent, without sending or writing anything.
    `slurm-tracker help` prints the whole manual (`help --man`: as a man page). Shell completion:
    see the README, section "Shell completion".
    """


def _state_path(config: Config, state_path: Optional[str]) -> Path:
    return Path(state_path) if state_path else config.state_file


def _client(config: Config) -> api.AllocationsClient:
    """An API client from the config and the environment (the key is never printed)."""
    if not config.api.organization:
        raise ConfigError(config.source, ["api.organization: required to talk to the API"])
    key = api.load_api_key(config.api.api_key_file, os.environ)
    return api.AllocationsClient(
        api.derive_base_url(config.api.url, key, os.environ),
        config.api.organization,
        key,
        connect_timeout_s=config.api.connect_timeout_s,
        read_timeout_s=config.api.read_timeout_s,
        max_attempts=config.api.max_attempts,
        max_retry_time_s=config.api.max_retry_time_s,
        requests_per_second=config.api.requests_per_second,
    )


def _fields(sacct_fields: Optional[str]) -> Optional[list[str]]:
    return [f.strip() for f in sacct_fields.split(",") if f.strip()] if sacct_fields else None


def _input_options(func: F) -> F:
    """The options of a sync: which state, which input, which clock, which output."""
    options = [
        _state_option,
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
            callback=_parse_now,
            help="Pin the clock (tests, replays).",
        ),
        _rows_output_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _show_plan(
    plans: Union[pipeline.Plan, Iterable[pipeline.Plan]],
    window: Optional[pipeline.Window],
    source: str,
    output: str,
    verbose: int,
) -> None:
    """Print a plan (or the plans of an input's batches, consumed as they come): JSON and the
    table are written batch by batch in bounded memory; CSV (whose columns are known at the
    end only) and -v (every event and skip) hold the whole plan."""
    if isinstance(plans, pipeline.Plan):
        plans = [plans]
    if output == "json":
        report.write_plan_json(plans, window, sys.stdout)
        sys.stdout.flush()
        return
    summary = report.summarize(plans, verbose=verbose > 0 or output == "csv")
    if output != "csv":
        click.echo(report.summary_text(summary, window, source=source))
        return
    click.echo(report.csv_text([report.event_json(e) for e in summary.all_events]), nl=False)


@main.command()
@_config_option
@click.option("--dry-run", is_flag=True, help="Plan and show; write no state, send nothing.")
@click.option(
    "--take-over",
    is_flag=True,
    help="Another agent's events on the API are counted as billed instead of stopping this "
    "sync (exit 5): only when that agent is stopped for good and this one replaces it.",
)
@_input_options
@_log_options
@handles_errors
def sync(
    config_path: Optional[str],
    dry_run: bool,
    take_over: bool,
    state_path: Optional[str],
    sacct_file: Optional[str],
    sacct_fields: Optional[str],
    now_at: Optional[datetime],
    output: str,
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
    _setup_logging(verbose, quiet)
    if now_at is not None and not (dry_run or sacct_file):
        raise click.UsageError(
            "--now pins the clock for dry runs and replays of saved files only (--dry-run or "
            "--sacct-file): a live sync always runs at the real time, so that the high-water "
            "mark cannot move past it"
        )
    config = _load(config_path)
    now_at = now_at or pipeline.utc_now()
    catalog = pipeline.load_catalog(config)
    path = _state_path(config, state_path)
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
            _show_plan(run.plans, run.window, run.source, output, verbose)
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
        client = _client(config)
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
    reason = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, TrackerError):
        return _exit_code(exc), reason
    if isinstance(exc, OSError):
        return (EXIT_TEMPFAIL if exc.errno in _TEMPORARY_ERRNOS else EXIT_FAILURE), reason
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


def _finish(result: pipeline.SyncResult, output: str) -> None:
    """Print a sync's summary and exit with the code its outcome calls for."""
    _emit(output, report.sync_json(result), lambda: report.sync_text(result))
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
@_config_option
@click.option(
    "--start",
    "start",
    required=True,
    metavar="DATE",
    callback=_parse_now,
    help="First day (or RFC 3339 time) to load, UTC.",
)
@click.option(
    "--end",
    "end",
    metavar="DATE",
    callback=_parse_now,
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
@_state_option
@_rows_output_option
@_log_options
@handles_errors
def backfill(
    config_path: Optional[str],
    start: datetime,
    end: Optional[datetime],
    chunk: Optional[str],
    dry_run: bool,
    sacct_file: Optional[str],
    state_path: Optional[str],
    output: str,
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
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    now_at = pipeline.utc_now()
    latest = backfilling.capped_end(now_at, now_at, config.sacct.lag_s)
    if end is None or (end > latest and sacct_file is None):
        if end is not None:
            logging.getLogger("slurm_tracker").warning(
                "--end capped at now minus sacct.lag, %s: slurmdbd may not have the rest yet, "
                "and the regular sync bills it",
                f"{latest:%Y-%m-%dT%H:%M:%SZ}",
            )
        end = latest
    if end <= start:
        raise click.BadParameter(
            f"--end must be after --start (the period ends {end:%Y-%m-%dT%H:%M:%SZ})",
            param_hint="--end",
        )
    try:
        chunk_s = parse_duration(chunk) if chunk else config.sacct.backfill_chunk_s
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--chunk") from exc
    catalog = pipeline.load_catalog(config)
    path = _state_path(config, state_path)
    period = backfilling.Period(start, end, chunk_s)
    saved = None
    if sacct_file is not None:
        source = "stdin" if sacct_file == "-" else sacct_file
        saved = pipeline.Input(pipeline.read_saved(sacct_file, sys.stdin.buffer), source, None)
    chunks = 1 if saved else len(period.windows())
    if dry_run:
        with State.open(path, readonly=True) as store, _progress(chunks, quiet) as shown:
            plan = backfilling.preview(
                config, store, catalog, period, os.environ, saved=saved, progress=shown
            )
        source = saved.source if saved else f"sacct ({config.sacct.path})"
        _show_plan(plan, pipeline.Window(start, end), source, output, verbose)
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


@main.command()
@_config_option
@_state_option
@_output_option
@click.option(
    "--check",
    "as_check",
    is_flag=True,
    help="Monitoring plugin (Nagios/Icinga): one line with perfdata; exit 0 OK, 1 WARNING, "
    "2 CRITICAL, 3 UNKNOWN, by the thresholds of the config's `monitoring:` section.",
)
@click.option("--now", "now_at", metavar="RFC3339", callback=_parse_now, hidden=True)
@_log_options
def status(
    config_path: Optional[str],
    state_path: Optional[str],
    output: str,
    as_check: bool,
    now_at: Optional[datetime],
    verbose: int,
    quiet: bool,
) -> None:
    """High-water mark, outbox backlog, recent totals and the last sync's outcome.

    With --check, the health of the agent as a monitoring plugin, e.g.
    `slurm-tracker status --check` from Icinga or NRPE.

    \b
    Examples:
      slurm-tracker status
      slurm-tracker status --output json
      slurm-tracker status --check
    """
    if as_check:
        _status_check(config_path, state_path, output, now_at, verbose, quiet)
    _status(config_path, state_path, output, now_at, verbose, quiet)


def _status_check(
    config_path: Optional[str],
    state_path: Optional[str],
    output: str,
    now_at: Optional[datetime],
    verbose: int,
    quiet: bool,
) -> None:
    """`status --check`: never a traceback, never an exit code outside 0-3."""
    _setup_logging(verbose, quiet)
    now_at = now_at or pipeline.utc_now()
    try:
        config = _load(config_path)
        result = health.check_state_file(
            _state_path(config, state_path), config.monitoring.thresholds, now_at
        )
    except Exception as exc:
        _log_unexpected(exc)
        result = health.unknown(f"{type(exc).__name__}: {exc}")
    if output == "json":
        click.echo(json.dumps({"check": result.json()}, indent=2))
    else:
        click.echo(result.line())
    sys.exit(result.state)


@handles_errors
def _status(
    config_path: Optional[str],
    state_path: Optional[str],
    output: str,
    now_at: Optional[datetime],
    verbose: int,
    quiet: bool,
) -> None:
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    now_at = now_at or pipeline.utc_now()
    path = _state_path(config, state_path)
    with State.open(path, readonly=True) as store:
        info = report.status_info(store, now_at, config.limits.clock_skew_s)
        info["syncs"] = health.json_times(health.sync_history(store, path))
    info["check"] = health.check_state_file(path, config.monitoring.thresholds, now_at).json()
    if output == "json":
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        click.echo(report.status_text(info))


@main.command()
@_config_option
@_state_option
@click.option("--online", is_flag=True, help="Also check the API key, allocations and SKUs.")
@_output_option
@_log_options
@handles_errors
def check(
    config_path: Optional[str],
    state_path: Optional[str],
    online: bool,
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Validate the configuration, the catalog and the state file (and the API with --online).

    Exit 0 when all is well, 3 when something must be fixed (each problem is listed; a bad
    config lists every problem with its line).

    \b
    Examples:
      slurm-tracker check
      slurm-tracker check --online --config /etc/slurm-tracker/config.yaml
      slurm-tracker check --output json
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    found: list[dict[str, str]] = [
        {"kind": "config", "status": "valid", "message": f"{config.source}: valid"}
    ]
    catalog = pipeline.load_catalog(config)
    if catalog is not None:
        found.append(
            {
                "kind": "catalog",
                "status": "valid",
                "message": f"{len(catalog.skus)} SKUs in {len(catalog.units)} units: valid",
            }
        )
        found += [
            {"kind": "catalog", "status": "warning", "message": w}
            for w in pipeline.catalog_warnings(config, catalog)
        ]
    path = _state_path(config, state_path)
    found += _check_state(config, path)
    if online:
        problems = pipeline.check_online(config, _client(config))
        found += [{"kind": "api", "status": "problem", "message": p} for p in problems]
        if not problems:
            found.append(
                {
                    "kind": "api",
                    "status": "valid",
                    "message": "key accepted; every mapped allocation and SKU exists",
                }
            )
    bad = any(f["status"] == "problem" for f in found)
    _emit(
        output,
        {"ok": not bad, "checks": found},
        lambda: "\n".join(
            f"{f['kind'] if f['status'] == 'valid' else f['status']:<11} "
            f"{report.printable(f['message'], 2000)}"
            for f in found
        ),
    )
    if bad:
        sys.exit(EXIT_CONFIG)


@main.command("help")
@click.argument("command", nargs=-1)
@click.option("--man", "as_man", is_flag=True, help="As a man page (roff), for man(1).")
def help_command(command: tuple[str, ...], as_man: bool) -> None:
    """The whole manual: every command's help (or COMMAND's), or a man page.

    \b
    Examples:
      slurm-tracker help | less
      slurm-tracker help outbox
      slurm-tracker help --man | gzip > /usr/local/share/man/man1/slurm-tracker.1.gz
    """
    root = click.Context(main, info_name="slurm-tracker")
    if as_man:
        exit_status = (__doc__ or "").split("Exit codes:", 1)[-1]
        click.echo(
            manual.man(main, root, __version__, datetime.now(timezone.utc).date(), exit_status),
            nl=False,
        )
        return
    if command and main.get_command(root, command[0]) is None:
        raise click.UsageError(f"no command {command[0]!r}: see `slurm-tracker --help`")
    click.echo(manual.text(main, root, command))


def _check_state(config: Config, path: Path) -> list[dict[str, str]]:
    """`check`'s findings about the state file."""
    if not path.exists():
        message = f"{path}: not created yet (the first sync creates it)"
        return [{"kind": "state file", "status": "valid", "message": message}]
    with State.open(path, readonly=True) as store:
        problems = store.integrity_problems()
        counts = store.counts()
        mark = store.high_water_at()
        quarantined = store.quarantine_count()
    found = [
        {"kind": "state file", "status": "problem", "message": f"state file {path}: {problem}"}
        for problem in problems
    ]
    if not problems:
        message = (
            f"{path}: intact ({counts['pending']} pending, {counts['held']} held, "
            f"{counts['dead']} dead; {quarantined} quarantined records)"
        )
        found.append({"kind": "state file", "status": "valid", "message": message})
    skew = config.limits.clock_skew_s
    if mark is not None and mark > pipeline.utc_now() + timedelta(seconds=skew):
        message = (
            f"high-water mark {mark:%Y-%m-%dT%H:%M:%SZ} is in the future: syncs would bill "
            "nothing; fix the clock, then `slurm-tracker state set-mark TIME`"
        )
        found.append({"kind": "state file", "status": "problem", "message": message})
    return found


@main.group()
def outbox() -> None:
    """See and deal with events the API refused (dead-lettered) or has not taken yet."""


@outbox.command("list")
@_config_option
@_state_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["pending", "sending", "held", "acked", "dead", "dropped"]),
    help="Only these statuses (repeatable; default: pending, sending, held and dead).",
)
@_rows_output_option
@_log_options
@handles_errors
def outbox_list(
    config_path: Optional[str],
    state_path: Optional[str],
    statuses: tuple[str, ...],
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """List outbox events: what waits to be sent, was refused, or is held back.

    \b
    Examples:
      slurm-tracker outbox list
      slurm-tracker outbox list --status dead --output json
      slurm-tracker outbox list --status acked --output csv > acked.csv
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.outbox(statuses or ("pending", "sending", "held", "dead"))
    _emit(output, [report.outbox_json(r) for r in rows], lambda: report.outbox_text(rows))


def _outbox_change(
    config_path: Optional[str],
    state_path: Optional[str],
    keys: tuple[str, ...],
    all_: bool,
    verb: str,
    output: str,
) -> None:
    if not keys and not all_:
        raise click.UsageError(f"name the event keys to {verb}, or pass --all")
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            change = {"retry": store.retry, "drop": store.drop, "release": store.release}[verb]
            count = change(None if all_ else list(keys), now_at)
    done = {
        "retry": "back to pending (the next sync sends them)",
        "drop": "dropped",
        "release": "released: the next sync sends them",
    }[verb]
    _emit(
        output,
        {"action": verb, "events": count},
        lambda: f"{count} event{'s' if count != 1 else ''} {done}",
    )


def _outbox_change_command(verb: str, help_text: str) -> None:
    """Register `outbox retry` or `outbox drop`: they differ only in what they do to a row."""

    @outbox.command(verb, help=help_text)
    @_config_option
    @_state_option
    @click.option(
        "--all",
        "all_",
        is_flag=True,
        help=f"Every {'held' if verb == 'release' else 'dead'} event.",
    )
    @click.argument("keys", nargs=-1)
    @_output_option
    @_log_options
    @handles_errors
    def command(
        config_path: Optional[str],
        state_path: Optional[str],
        all_: bool,
        keys: tuple[str, ...],
        output: str,
        verbose: int,
        quiet: bool,
    ) -> None:
        _setup_logging(verbose, quiet)
        _outbox_change(config_path, state_path, keys, all_, verb, output)


_outbox_change_command(
    "retry",
    "Put dead (or dropped) events back in the queue, e.g. after fixing an allocation.\n\n"
    "\b\nExamples:\n  slurm-tracker outbox retry --all\n"
    "  slurm-tracker outbox retry st1:box:1234:1767225600:0-3600:SLURM_CPU_HOUR",
)
_outbox_change_command(
    "drop",
    "Give up dead events: they are kept, marked dropped, never sent.\n\n"
    "\b\nExamples:\n  slurm-tracker outbox drop st1:box:1234:1767225600:0-3600:SLURM_CPU_HOUR\n"
    "  slurm-tracker outbox drop --all",
)
_outbox_change_command(
    "release",
    "Send held events (quantity above limits.hold_above) after checking them: they go back "
    "to pending and the next sync sends them.\n\n"
    "\b\nExamples:\n  slurm-tracker outbox list --status held\n"
    "  slurm-tracker outbox release st1:box:1234:1767225600:0-3600:SLURM_CPU_HOUR",
)


@outbox.command("replan")
@_config_option
@_state_option
@click.option("--all", "all_", is_flag=True, help="Every dead event.")
@click.argument("keys", nargs=-1)
@_output_option
@_log_options
@handles_errors
def outbox_replan(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    keys: tuple[str, ...],
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Map dead events again with the current configuration (e.g. after fixing a typo in
    accounts.map), looking each one up on the API first; the next sync sends them.

    \b
    Examples:
      slurm-tracker outbox replan --all
      slurm-tracker outbox replan st1:box:1234:1767225600:0-3600:SLURM_CPU_HOUR
    """
    _setup_logging(verbose, quiet)
    if not keys and not all_:
        raise click.UsageError("name the event keys to replan, or pass --all")
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    client = _client(config)
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            results = replan.replan(config, store, client, None if all_ else list(keys), now_at)
    _emit(
        output,
        [{"key": r.key, "outcome": r.outcome, "detail": r.detail} for r in results],
        lambda: (
            "\n".join(f"{r.outcome:<10} {r.key}: {report.printable(r.detail)}" for r in results)
            or "no dead events to replan"
        ),
    )
    if any(r.outcome == "refused" for r in results):
        sys.exit(EXIT_UNDELIVERED)


@main.group()
def catalog() -> None:
    """The rating catalog (units, SKUs, effective-dated rates) used by dry runs."""


@catalog.command("pull")
@_config_option
@click.option(
    "--file",
    "file_path",
    metavar="PATH",
    help="Where to write the catalog (default: catalog_file from the config).",
)
@_output_option
@_log_options
@handles_errors
def catalog_pull(
    config_path: Optional[str],
    file_path: Optional[str],
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Read the organisation's units, SKUs and rate rules from the API into a YAML file.

    \b
    Examples:
      slurm-tracker catalog pull
      slurm-tracker catalog pull --file /etc/slurm-tracker/catalog.yaml
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    target = Path(file_path) if file_path else config.catalog_file
    if target is None:
        raise click.UsageError("pass --file PATH, or set catalog_file in the config")
    pulled = pipeline.pull_catalog(_client(config), pipeline.utc_now())
    # 0644: rates are not secret, and dry runs by other admins read them; nobody else may
    # write the file (files.py refuses a catalog others can write).
    write_atomically(target, rating.dump_catalog(pulled).encode("utf-8"), mode=0o644)
    warnings = pipeline.catalog_warnings(config, pulled)
    _emit(
        output,
        {
            "file": str(target),
            "skus": len(pulled.skus),
            "units": len(pulled.units),
            "warnings": warnings,
        },
        lambda: (
            f"catalog with {len(pulled.skus)} SKUs in {len(pulled.units)} units written to {target}"
        ),
    )
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@catalog.command("show")
@_config_option
@click.option(
    "--at",
    "at",
    metavar="RFC3339",
    callback=_parse_now,
    help="Show the rates in force at this time (default: now).",
)
@_rows_output_option
@_log_options
@handles_errors
def catalog_show(
    config_path: Optional[str], at: Optional[datetime], output: str, verbose: int, quiet: bool
) -> None:
    """The rates in force per SKU, and their history.

    \b
    Examples:
      slurm-tracker catalog show
      slurm-tracker catalog show --at 2026-01-01 --output csv
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    current = pipeline.load_catalog(config)
    if current is None:
        raise ConfigError(config.source, ["no catalog: set catalog_file or a catalog section"])
    rates = rating.effective_rates(current, at or pipeline.utc_now())
    _emit(output, report.rates_json(rates), lambda: report.rates_text(rates))


@main.group()
def quarantine() -> None:
    """Records that were rejected (malformed or implausible) and never billed."""


@quarantine.command("list")
@_config_option
@_state_option
@click.option("--all", "all_", is_flag=True, help="Resolved entries too.")
@_rows_output_option
@_log_options
@handles_errors
def quarantine_list(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    output: str,
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
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.quarantine_rows(include_resolved=all_)
    _emit(
        output,
        [report.quarantine_json(r) for r in rows],
        lambda: report.quarantine_text(rows, verbose > 0),
    )


@main.group("state")
def state_group() -> None:
    """Repair the state file."""


@state_group.command("rebuild")
@_config_option
@_state_option
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
    callback=_parse_now,
    help="Read the events that ended since then (default: a day before the billing floor, "
    "or the last 30 days).",
)
@click.option("--take-over", is_flag=True, help="Count another agent's events as billed too.")
@_output_option
@_log_options
@handles_errors
def state_rebuild(
    config_path: Optional[str],
    state_path: Optional[str],
    from_api: bool,
    start: Optional[datetime],
    take_over: bool,
    output: str,
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
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    client = _client(config)
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            floor = pipeline.billing_floor(store, config)
            since = start or (floor - timedelta(days=1) if floor else now_at - timedelta(days=30))
            found = pipeline.compare_with_api(
                config, store, client, since, take_over=take_over, relearn=True
            )
    _emit(
        output,
        {"since": since.isoformat(), "read": found.read, "adopted": found.adopted},
        lambda: (
            f"{found.read} events of cluster {config.cluster} on the API ended since "
            f"{since:%Y-%m-%dT%H:%M:%SZ}; {found.adopted} were unknown to {path} and are now "
            "counted as billed"
        ),
    )


@state_group.command("set-mark")
@_config_option
@_state_option
@click.argument("time", metavar="TIME", callback=_parse_now)
@click.option("--yes", is_flag=True, help="Do it (without it, only say what would change).")
@_output_option
@_log_options
@handles_errors
def state_set_mark(
    config_path: Optional[str],
    state_path: Optional[str],
    time: datetime,
    yes: bool,
    output: str,
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
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    if not yes:
        with State.open(path, readonly=True) as store:
            mark = store.high_water_at()
        old = f"{mark:%Y-%m-%dT%H:%M:%SZ}" if mark else "none"
        _emit(
            output,
            {"changed": False, "from": mark, "to": time},
            lambda: (
                f"would set the high-water mark of {path} from {old} to "
                f"{time:%Y-%m-%dT%H:%M:%SZ}; pass --yes to do it"
            ),
        )
        return
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            previous = store.set_high_water(time, now_at, overlap_s=config.sacct.overlap_s)
    old = f"{previous:%Y-%m-%dT%H:%M:%SZ}" if previous else "none"
    _emit(
        output,
        {"changed": True, "from": previous, "to": time},
        lambda: f"high-water mark of {path}: {old} -> {time:%Y-%m-%dT%H:%M:%SZ}",
    )


EXIT_DISCREPANCIES = 6  # reconcile found discrepancies between slurmdbd and the API


@main.command("reconcile")
@_config_option
@click.option(
    "--start",
    required=True,
    metavar="TIME",
    callback=_parse_now,
    help="Start of the window (a date or RFC 3339 time, UTC).",
)
@click.option(
    "--end", required=True, metavar="TIME", callback=_parse_now, help="End (exclusive), UTC."
)
@click.option(
    "--repair",
    is_flag=True,
    help="Also show the repair: delete duplicates and overlaps, post what is missing.",
)
@click.option("--yes", is_flag=True, help="With --repair: do it (every change logged and shown).")
@_state_option
@click.option(
    "--sacct-file",
    metavar="PATH",
    help="Judge a saved sacct capture ('-' for stdin) instead of running sacct.",
)
@_output_option
@_log_options
@handles_errors
def reconcile_command(
    config_path: Optional[str],
    start: datetime,
    end: datetime,
    repair: bool,
    yes: bool,
    state_path: Optional[str],
    sacct_file: Optional[str],
    output: str,
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
    _setup_logging(verbose, quiet)
    if yes and not repair:
        raise click.UsageError("--yes only goes with --repair")
    if end <= start:
        raise click.BadParameter("--end must be after --start", param_hint="--end")
    config = _load(config_path)
    catalog = pipeline.load_catalog(config)
    path = _state_path(config, state_path)
    window = pipeline.Window(start, end)
    client = _client(config)
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
    output: str,
    found: reconciling.Report,
    fix: Optional[reconciling.Repair],
    applied: Optional[reconciling.Applied] = None,
    after: Optional[reconciling.Report] = None,
) -> None:
    if output == "json":
        click.echo(json.dumps(reconciling.as_json(found, fix, applied, after), indent=2))
    else:
        click.echo(reconciling.as_text(found, fix, applied, after))


@main.group("corrections")
def corrections_group() -> None:
    """Runs slurmdbd now says used less than was billed (e.g. runaway jobs an admin fixed).

    A sync or backfill that reads a final run whose ElapsedRaw is below the seconds already
    billed records a correction instead of billing. Nothing changes on the API unless asked:
    `corrections apply --yes`, or `corrections: {apply: true}` in the config (each sync then
    applies the open ones after delivering).
    """


@corrections_group.command("list")
@_config_option
@_state_option
@click.option("--all", "all_", is_flag=True, help="Applied and dismissed ones too.")
@_rows_output_option
@_log_options
@handles_errors
def corrections_list(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """List corrections (the open ones unless --all), oldest first.

    \b
    Examples:
      slurm-tracker corrections list
      slurm-tracker corrections list --all --output csv
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.corrections(include_closed=all_)
    _emit(output, [correcting.row_json(r) for r in rows], lambda: correcting.list_text(rows))


@corrections_group.command("apply")
@_config_option
@_state_option
@click.option("--yes", is_flag=True, help="Do it (without it, only show what it would do).")
@click.argument("runs", nargs=-1, metavar="[RUN|JOBID]...")
@_output_option
@_log_options
@handles_errors
def corrections_apply(
    config_path: Optional[str],
    state_path: Optional[str],
    yes: bool,
    runs: tuple[str, ...],
    output: str,
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
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    catalog = pipeline.load_catalog(config)
    path = _state_path(config, state_path)
    client = _client(config)
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
    if output == "json":
        click.echo(json.dumps(correcting.attempts_json(attempts, yes), indent=2))
    else:
        click.echo(correcting.attempts_text(attempts, yes))
    if yes and any(a.status == "open" for a in attempts):
        sys.exit(EXIT_UNDELIVERED)


@corrections_group.command("dismiss")
@_config_option
@_state_option
@click.argument("runs", nargs=-1, required=True, metavar="RUN|JOBID...")
@click.option("--reason", default="", help="Why (kept with the correction).")
@_output_option
@_log_options
@handles_errors
def corrections_dismiss(
    config_path: Optional[str],
    state_path: Optional[str],
    runs: tuple[str, ...],
    reason: str,
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Leave the API's record of these runs as it is: their open corrections are dismissed.

    A correction whose apply already deleted events cannot be dismissed: apply it.

    \b
    Examples:
      slurm-tracker corrections dismiss 1234 --reason "billed as agreed with the PI"
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            chosen = [r.run for r in store.corrections() if r.run in runs or r.job_id in runs]
            count = store.dismiss_corrections(
                chosen, reason or "dismissed by an operator (`corrections dismiss`)", now_at
            )
    _emit(
        output,
        {"dismissed": count},
        lambda: f"{count} correction{'s' if count != 1 else ''} dismissed",
    )


# ---------------------------------------------------------------- migrate (from the Go agent)
# (imported here to keep this block in one piece)
from slurm_tracker import migrate_config, migrate_state  # noqa: E402


@main.group("migrate")
def migrate_group() -> None:
    """Switch from the older Go slurm-tracker: its config, then its state.

    Stop the old agent's timer first; then `migrate config`, `migrate state`,
    `check --online`, `sync --dry-run`, and start the new timer.
    """


@migrate_group.command("config")
@click.argument("old_config", metavar="OLD.json", type=click.Path(dir_okay=False))
@click.option("--file", "file_path", metavar="PATH", help="Write the YAML config here (new file).")
@click.option("--cluster", help="Cluster name (default: ClusterName of slurm.conf).")
@click.option("--organization", default="", help="The organization (the old agent's flag).")
@click.option(
    "--url", default="", help="API URL (default: https://$PW_PLATFORM_HOST, else from the key)."
)
@_log_options
@handles_errors
def migrate_config_command(
    old_config: str,
    file_path: Optional[str],
    cluster: Optional[str],
    organization: str,
    url: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Turn the Go agent's JSON config into an equivalent, commented YAML config.

    Every mapped partition is billed as core-hours (what the old agent billed); the defaults
    are kept; what cannot be carried over is listed. Printed, or written to --file.

    \b
    Examples:
      slurm-tracker migrate config /etc/slurm-tracker/config.json --organization my-org
      slurm-tracker migrate config old.json --cluster hpc1 --file /etc/slurm-tracker/config.yaml
    """
    _setup_logging(verbose, quiet)
    old = migrate_config.read_old_config(Path(old_config))
    cluster = cluster or migrate_config.cluster_from_slurm_conf(os.environ)
    if not cluster:
        raise click.UsageError(
            "no cluster name: slurm.conf was not readable; pass --cluster NAME (the name "
            "sacct shows in its Cluster column)"
        )
    migrated = migrate_config.to_yaml(
        old,
        cluster=cluster,
        organization=organization,
        url=url or migrate_config.url_from_environment(os.environ),
        source=old_config,
    )
    if file_path is None:
        click.echo(migrated.text, nl=False)
    else:
        target = Path(file_path)
        if os.path.lexists(target):
            raise click.UsageError(f"{target} exists: choose another --file, or remove it first")
        write_atomically(target, migrated.text.encode(), mode=0o644)
    for line in migrate_config.summary(migrated, file_path):
        click.echo(line, err=True)


@migrate_group.command("state")
@click.argument("old_state", metavar="OLD.db", type=click.Path(dir_okay=False))
@_config_option
@_state_option
@click.option("--dry-run", is_flag=True, help="Show what would be recorded; write nothing.")
@click.option(
    "--sacct-file",
    metavar="PATH",
    help="Read a saved sacct capture ('-' for stdin) instead of running sacct.",
)
@click.option(
    "--skip",
    "skip",
    multiple=True,
    type=int,
    metavar="JOBID",
    help="Leave this old job id out (after checking it by hand); repeatable.",
)
@_output_option
@_log_options
@handles_errors
def migrate_state_command(
    old_state: str,
    config_path: Optional[str],
    state_path: Optional[str],
    dry_run: bool,
    sacct_file: Optional[str],
    skip: tuple[int, ...],
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Carry the Go agent's progress into a new state file, so the first sync bills the rest.

    Each job the old agent billed that may still change is matched to its run in slurmdbd
    (the run that was running when it last reported it); the elapsed seconds it billed are
    recorded as billed, and the billing floor and high-water mark go to the cutover. Job ids
    that match no run, several, or a reused id stop it (exit 3, nothing written). The old
    state file is only read.

    \b
    Examples:
      slurm-tracker migrate state /var/lib/slurm-tracker/old.db --dry-run
      slurm-tracker migrate state old.db --state /var/lib/slurm-tracker/state.db
      slurm-tracker migrate state old.db --skip 4242 --output json
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    migration, written = migrate_state.migrate(
        config,
        Path(old_state),
        _state_path(config, state_path),
        dry_run=dry_run,
        sacct_file=sacct_file,
        stdin=sys.stdin.buffer,
        environ=os.environ,
        skip=skip,
    )
    if output == "json":
        click.echo(json.dumps(migrate_state.as_json(migration, written), indent=2))
    else:
        click.echo(migrate_state.as_text(migration, written, dry_run))
    if migration.problems:
        _fail(
            f"old agent state {old_state}: {len(migration.problems)} job id(s) cannot be "
            "carried over safely (listed above); nothing was written",
            EXIT_CONFIG,
        )


# --- `report`: the cost and utilisation report (slurm_tracker.costs) ------------------------

REPORT_DEFAULT_DAYS = 7


@main.command("report")
@_config_option
@click.option(
    "--start",
    metavar="TIME",
    callback=_parse_now,
    help=f"Start of the period (a date or RFC 3339 time, UTC; default: {REPORT_DEFAULT_DAYS} "
    "days before --end).",
)
@click.option(
    "--end", metavar="TIME", callback=_parse_now, help="End (exclusive), UTC (default: now)."
)
@click.option(
    "--by",
    type=click.Choice(["account", "user", "partition", "allocation", "job-name", "job"]),
    default="account",
    show_default=True,
    help="What the rows and the chart's series are.",
)
@click.option(
    "--top",
    type=click.IntRange(1, 100),
    default=10,
    show_default=True,
    help="Groups shown (table and chart); the others are summed as (other).",
)
@click.option(
    "--output",
    type=click.Choice(["table", "json", "csv", "html"]),
    default="table",
    show_default=True,
)
@click.option(
    "--file",
    "file_path",
    metavar="PATH",
    help="Write the report to PATH instead of standard output.",
)
@click.option(
    "--sacct-file",
    metavar="PATH",
    help="Read a saved sacct capture with its step records ('-' for stdin) instead of sacct.",
)
@_log_options
@handles_errors
def report_command(
    config_path: Optional[str],
    start: Optional[datetime],
    end: Optional[datetime],
    by: str,
    top: int,
    output: str,
    file_path: Optional[str],
    sacct_file: Optional[str],
    verbose: int,
    quiet: bool,
) -> None:
    """Cost and utilisation of the jobs of [START, END): where the cost is, and who uses less
    than they asked for (right-sizing hints), with a cost chart per 15 minutes.

    Reads sacct (allocations and their steps) in chunks like backfill, or a saved capture.
    Prices: the config's `pricing` section, else the rating catalog of the mapped SKUs.

    \b
    Examples:
      slurm-tracker report
      slurm-tracker report --start 2026-11-01 --end 2026-12-01 --by user --top 20
      slurm-tracker report --by allocation --output html --file report.html
      slurm-tracker report --start 2026-11-23 --output csv --sacct-file week.txt > week.csv
    """
    # imported here: the cron-run commands never load the report's modules
    from slurm_tracker.costs import (  # noqa: PLC0415
        groups,
        reading,
        render_data,
        render_html,
        render_text,
    )

    _setup_logging(verbose, quiet)
    now_at = pipeline.utc_now().replace(microsecond=0)
    end_at = min(end or now_at, now_at)  # the future has no usage (and idle nodes no cost yet)
    start_at = start or end_at - timedelta(days=REPORT_DEFAULT_DAYS)
    if start_at >= now_at:
        raise click.BadParameter("is in the future: nothing ran yet", param_hint="--start")
    if end_at <= start_at:
        raise click.BadParameter("--end must be after --start", param_hint="--end")
    config = _load(config_path)
    has_prices = config.pricing is not None and bool(
        config.pricing.exact or config.pricing.patterns or config.pricing.default
    )
    catalog = None if has_prices else pipeline.load_catalog(config)

    def progress(number: int, count: int, window: pipeline.Window) -> None:
        if not quiet:
            click.echo(
                f"slurm-tracker: reading sacct {number}/{count}: "
                f"{window.start_at:%Y-%m-%d %H:%M} .. {window.end_at:%Y-%m-%d %H:%M} UTC",
                err=True,
            )

    usage = reading.read_usage(
        config,
        start_at,
        end_at,
        sacct_file=sacct_file,
        stdin=sys.stdin.buffer,
        environ=os.environ,
        with_job_name=by == "job-name",
        progress=progress,
    )
    made = groups.build_report(config, catalog, usage, by=by, start_at=start_at, end_at=end_at)
    if output == "json":
        text = json.dumps(render_data.as_json(made, top), indent=2) + "\n"
    elif output == "csv":
        text = render_data.as_csv(made, top)
    elif output == "html":
        text = render_html.as_html(made, top)
    else:
        text = render_text.as_text(made, top)
    if file_path is None:
        click.echo(text, nl=False)
        return
    render_data.write_file(Path(file_path), text)
    if not quiet:
        click.echo(f"slurm-tracker: report written to {file_path}", err=True)
