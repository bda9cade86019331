"""Command-line interface. The only module that prints and chooses exit codes.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 3 invalid configuration or state file
(or an unsafe file, or a high-water mark in the future); 4 some events dead-lettered, held or
still pending; 5 another agent bills this cluster; 6 reconcile found discrepancies; 75 temporary
failure (cron: just try again).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import click
from dateutil import parser as dateparser

from slurm_tracker import (
    __version__,
    api,
    correcting,
    health,
    ledger,
    metrics,
    pipeline,
    rating,
    replan,
    report,
)
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
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("slurm-tracker: %(levelname)s: %(message)s"))
    root = logging.getLogger("slurm_tracker")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(message: str, code: int) -> None:
    click.echo(f"slurm-tracker: error: {message}", err=True)
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


def _log_options(func: F) -> F:
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
    "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


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
        _output_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _show_plan(
    plan: pipeline.Plan, window: Optional[pipeline.Window], source: str, output: str, verbose: int
) -> None:
    totals = pipeline.totals(plan.events)
    if output == "json":
        click.echo(json.dumps(report.plan_json(plan, totals, window), indent=2))
    else:
        click.echo(report.plan_text(plan, totals, window, source=source, verbose=verbose > 0))


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
            mark = pipeline.check_mark(store, config)
            floor_at = pipeline.billing_floor(store, config)
            window = pipeline.sync_window(now_at, mark, config.sacct, floor_at)
            given = pipeline.gather(config, window, sacct_file, stdin, os.environ)
            if given.window is not None and store.floor_at() is None:
                floor_at = max(window.start_at, floor_at or window.start_at)  # as the sync would
            parsed = pipeline.parse_input(config, given, _fields(sacct_fields))
            reported = store.reported(r.run for r in parsed.records)
            forgotten_before = store.pruned_before()
        plan = pipeline.plan_usage(
            parsed,
            reported,
            config,
            catalog,
            now_at=pipeline.utc_now(),
            floor_at=floor_at,
            forgotten_before=forgotten_before,
            agent=ledger.agent_id(path),
        )
        _show_plan(plan, given.window, given.source, output, verbose)
        return
    request = pipeline.SyncRequest(
        now_at, sacct_file, _fields(sacct_fields), stdin, os.environ, take_over
    )
    result = _recorded_sync(config, path, catalog, request)
    _finish(result, output)


def _recorded_sync(
    config: Config,
    path: Path,
    catalog: Optional[rating.Catalog],
    request: pipeline.SyncRequest,
) -> pipeline.SyncResult:
    """A live sync whose outcome is recorded whatever happens (see health.py): in the state
    when it is open under our lock, else in ``<state>.last-failure``; the metrics file is
    written after it whenever the state is open. The original error passes through unchanged.
    """
    started_at = pipeline.utc_now()
    recorded = False
    try:
        client = _client(config)
        with StateLock(path) as lock:
            lock.acquire(request.now_at)
            with State.open(path) as store:
                try:
                    result = pipeline.sync_once(config, store, client, catalog, request)
                    result = correcting.after_sync(config, store, client, catalog, result)
                except BaseException as exc:
                    recorded = True
                    _record_failure(store, path, started_at, exc)
                    raise
                finally:
                    _write_metrics(config, store)
    except BaseException as exc:
        if not recorded:
            _record_failure(None, path, started_at, exc)
        raise
    if result.outcome in health.SUCCESS_OUTCOMES:
        health.clear_failure_trace(path)
    return result


def _record_failure(
    store: Optional[State], path: Path, started_at: datetime, exc: BaseException
) -> None:
    """Record a failed sync (never raising, never changing ``exc``)."""
    code, reason = failure_of(exc)
    if code is None:
        return
    try:
        health.record_failed_sync(store, path, started_at, code, reason)
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
    if output == "json":
        click.echo(json.dumps(report.sync_json(result), indent=2))
    else:
        click.echo(report.sync_text(result))
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
    required=True,
    metavar="DATE",
    callback=_parse_now,
    help="End (exclusive) of the period, UTC.",
)
@click.option(
    "--chunk",
    default=None,
    metavar="DURATION",
    help="One sacct call per chunk (default: sacct.backfill_chunk, 1d).",
)
@click.option("--dry-run", is_flag=True, help="Plan and show; write no state, send nothing.")
@_state_option
@_output_option
@_log_options
@handles_errors
def backfill(
    config_path: Optional[str],
    start: datetime,
    end: datetime,
    chunk: Optional[str],
    dry_run: bool,
    state_path: Optional[str],
    output: str,
    verbose: int,
    quiet: bool,
) -> None:
    """Load history: one sacct call per chunk of [START, END), with a pause between chunks.

    Usage already reported (by syncs or an earlier backfill) is not reported again; the
    high-water mark of the regular sync is left alone.
    """
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    if end <= start:
        raise click.BadParameter("--end must be after --start", param_hint="--end")
    try:
        chunk_s = parse_duration(chunk) if chunk else config.sacct.backfill_chunk_s
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--chunk") from exc
    catalog = pipeline.load_catalog(config)
    path = _state_path(config, state_path)
    windows = pipeline.chunks(start, end, chunk_s)
    if dry_run:
        with State.open(path, readonly=True) as store:
            plan = pipeline.backfill_plan(config, store, catalog, windows, os.environ)
        _show_plan(
            plan, pipeline.Window(start, end), f"sacct ({config.sacct.path})", output, verbose
        )
        return
    client = _client(config)
    now_at = pipeline.utc_now()
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            result = pipeline.backfill(config, store, client, catalog, windows, os.environ)
    _finish(result, output)


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
@_log_options
@handles_errors
def check(
    config_path: Optional[str], state_path: Optional[str], online: bool, verbose: int, quiet: bool
) -> None:
    """Validate the configuration, the catalog and the state file (and the API with --online)."""
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    click.echo(f"config      {config.source}: valid")
    catalog = pipeline.load_catalog(config)
    if catalog is not None:
        click.echo(f"catalog     {len(catalog.skus)} SKUs in {len(catalog.units)} units: valid")
        for warning in pipeline.catalog_warnings(config, catalog):
            click.echo(f"warning     {warning}")
    path = _state_path(config, state_path)
    state_problems: list[str] = []
    if path.exists():
        with State.open(path, readonly=True) as store:
            state_problems = store.integrity_problems()
            counts = store.counts()
            mark = store.high_water_at()
            quarantined = store.quarantine_count()
        if state_problems:
            for problem in state_problems:
                click.echo(f"problem     state file {path}: {problem}")
        else:
            click.echo(
                f"state file  {path}: intact ({counts['pending']} pending, {counts['held']} "
                f"held, {counts['dead']} dead; {quarantined} quarantined records)"
            )
        skew = config.limits.clock_skew_s
        if mark is not None and mark > pipeline.utc_now() + timedelta(seconds=skew):
            state_problems.append("high-water mark in the future")
            click.echo(
                f"problem     high-water mark {mark:%Y-%m-%dT%H:%M:%SZ} is in the future: syncs "
                "would bill nothing; fix the clock, then `slurm-tracker state set-mark TIME`"
            )
    else:
        click.echo(f"state file  {path}: not created yet (the first sync creates it)")
    if online:
        problems = pipeline.check_online(config, _client(config))
        for problem in problems:
            click.echo(f"problem     {problem}")
        if problems:
            sys.exit(EXIT_CONFIG)
        click.echo("api         key accepted; every mapped allocation and SKU exists")
    if state_problems:
        sys.exit(EXIT_CONFIG)


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
@_output_option
@handles_errors
def outbox_list(
    config_path: Optional[str], state_path: Optional[str], statuses: tuple[str, ...], output: str
) -> None:
    """List outbox events."""
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.outbox(statuses or ("pending", "sending", "held", "dead"))
    if output == "json":
        click.echo(json.dumps([report.outbox_json(r) for r in rows], indent=2))
    else:
        click.echo(report.outbox_text(rows))


def _outbox_change(
    config_path: Optional[str],
    state_path: Optional[str],
    keys: tuple[str, ...],
    all_: bool,
    verb: str,
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
    click.echo(f"{count} event{'s' if count != 1 else ''} {done}")


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
    @handles_errors
    def command(
        config_path: Optional[str], state_path: Optional[str], all_: bool, keys: tuple[str, ...]
    ) -> None:
        _outbox_change(config_path, state_path, keys, all_, verb)


_outbox_change_command(
    "retry", "Put dead (or dropped) events back in the queue, e.g. after fixing an allocation."
)
_outbox_change_command("drop", "Give up dead events: they are kept, marked dropped, never sent.")
_outbox_change_command(
    "release",
    "Send held events (quantity above limits.hold_above) after checking them: they go back "
    "to pending and the next sync sends them.",
)


@outbox.command("replan")
@_config_option
@_state_option
@click.option("--all", "all_", is_flag=True, help="Every dead event.")
@click.argument("keys", nargs=-1)
@handles_errors
def outbox_replan(
    config_path: Optional[str], state_path: Optional[str], all_: bool, keys: tuple[str, ...]
) -> None:
    """Map dead events again with the current configuration (e.g. after fixing a typo in
    accounts.map), looking each one up on the API first; the next sync sends them."""
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
    if not results:
        click.echo("no dead events to replan")
    for result in results:
        click.echo(f"{result.outcome:<10} {result.key}: {report.printable(result.detail)}")
    if any(r.outcome == "refused" for r in results):
        sys.exit(EXIT_UNDELIVERED)


@main.group()
def catalog() -> None:
    """The rating catalog (units, SKUs, effective-dated rates) used by dry runs."""


@catalog.command("pull")
@_config_option
@click.option(
    "--output",
    "output_path",
    metavar="PATH",
    help="Where to write the catalog (default: catalog_file from the config).",
)
@_log_options
@handles_errors
def catalog_pull(
    config_path: Optional[str], output_path: Optional[str], verbose: int, quiet: bool
) -> None:
    """Read the organisation's units, SKUs and rate rules from the API into a YAML file."""
    _setup_logging(verbose, quiet)
    config = _load(config_path)
    target = Path(output_path) if output_path else config.catalog_file
    if target is None:
        raise click.UsageError("pass --output PATH, or set catalog_file in the config")
    pulled = pipeline.pull_catalog(_client(config), pipeline.utc_now())
    # 0644: rates are not secret, and dry runs by other admins read them; nobody else may
    # write the file (files.py refuses a catalog others can write).
    write_atomically(target, rating.dump_catalog(pulled).encode("utf-8"), mode=0o644)
    click.echo(
        f"catalog with {len(pulled.skus)} SKUs in {len(pulled.units)} units written to {target}"
    )
    for warning in pipeline.catalog_warnings(config, pulled):
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
@_output_option
@handles_errors
def catalog_show(config_path: Optional[str], at: Optional[datetime], output: str) -> None:
    """The rates in force per SKU, and their history."""
    config = _load(config_path)
    current = pipeline.load_catalog(config)
    if current is None:
        raise ConfigError(config.source, ["no catalog: set catalog_file or a catalog section"])
    rates = rating.effective_rates(current, at or pipeline.utc_now())
    if output == "json":
        click.echo(json.dumps(report.rates_json(rates), indent=2))
    else:
        click.echo(report.rates_text(rates))


@main.group()
def quarantine() -> None:
    """Records that were rejected (malformed or implausible) and never billed."""


@quarantine.command("list")
@_config_option
@_state_option
@click.option("--all", "all_", is_flag=True, help="Resolved entries too.")
@_output_option
@click.option("-v", "--verbose", is_flag=True, help="Whole reasons and the records as read.")
@handles_errors
def quarantine_list(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    output: str,
    verbose: bool,
) -> None:
    """List quarantined records, oldest first.

    A record lands here when it cannot be billed as it is (a corrupt field, End before Start,
    a count above the limits...). It is never billed in that form. When slurmdbd later shows a
    sane record of the same run (after `sacctmgr` fixed it, say), the next sync or backfill
    that reads it bills it as usual and the entry is marked resolved.
    """
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.quarantine_rows(include_resolved=all_)
    if output == "json":
        click.echo(json.dumps([report.quarantine_json(r) for r in rows], indent=2))
    else:
        click.echo(report.quarantine_text(rows, verbose))


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
@_log_options
@handles_errors
def state_rebuild(
    config_path: Optional[str],
    state_path: Optional[str],
    from_api: bool,
    start: Optional[datetime],
    take_over: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Bring the state file in line with what the API holds, instead of billing again.

    Every event of this cluster on the mapped allocations that the state file does not know
    (it was lost, replaced, or restored from an old backup) is counted as billed. A sync does
    the same by itself for a new state file and for events created since its last sync; use
    this to reach further back.
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
    click.echo(
        f"{found.read} events of cluster {config.cluster} on the API ended since "
        f"{since:%Y-%m-%dT%H:%M:%SZ}; {found.adopted} were unknown to {path} and are now "
        "counted as billed"
    )


@state_group.command("set-mark")
@_config_option
@_state_option
@click.argument("time", metavar="TIME", callback=_parse_now)
@click.option("--yes", is_flag=True, help="Do it (without it, only say what would change).")
@handles_errors
def state_set_mark(
    config_path: Optional[str], state_path: Optional[str], time: datetime, yes: bool
) -> None:
    """Set the high-water mark to TIME (RFC 3339), e.g. after a wrong clock moved it ahead.

    The next sync reads from TIME minus sacct.overlap. Moving the mark back bills nothing twice
    (every run's progress is kept), as long as TIME is after the point where old progress was
    pruned (refused otherwise).
    """
    config = _load(config_path)
    path = _state_path(config, state_path)
    now_at = pipeline.utc_now()
    if not yes:
        with State.open(path, readonly=True) as store:
            mark = store.high_water_at()
        old = f"{mark:%Y-%m-%dT%H:%M:%SZ}" if mark else "none"
        click.echo(
            f"would set the high-water mark of {path} from {old} to {time:%Y-%m-%dT%H:%M:%SZ}; "
            "pass --yes to do it"
        )
        return
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            previous = store.set_high_water(time, now_at, overlap_s=config.sacct.overlap_s)
    old = f"{previous:%Y-%m-%dT%H:%M:%SZ}" if previous else "none"
    click.echo(f"high-water mark of {path}: {old} -> {time:%Y-%m-%dT%H:%M:%SZ}")


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
            pipeline.deliver_outbox(store, client, pipeline.utc_now, config.api.concurrency)
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
@_output_option
@handles_errors
def corrections_list(
    config_path: Optional[str], state_path: Optional[str], all_: bool, output: str
) -> None:
    """List corrections (the open ones unless --all), oldest first."""
    config = _load(config_path)
    with State.open(_state_path(config, state_path), readonly=True) as store:
        rows = store.corrections(include_closed=all_)
    if output == "json":
        click.echo(json.dumps([correcting.row_json(r) for r in rows], indent=2))
    else:
        click.echo(correcting.list_text(rows))


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
                pipeline.deliver_outbox(store, client, pipeline.utc_now, config.api.concurrency)
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
@handles_errors
def corrections_dismiss(
    config_path: Optional[str], state_path: Optional[str], runs: tuple[str, ...], reason: str
) -> None:
    """Leave the API's record of these runs as it is: their open corrections are dismissed.

    A correction whose apply already deleted events cannot be dismissed: apply it."""
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
    click.echo(f"{count} correction{'s' if count != 1 else ''} dismissed")
