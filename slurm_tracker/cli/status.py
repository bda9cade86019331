"""`status` (and `status --check`, a monitoring plugin), `check` and `help`: how the agent
is doing, whether its config, catalog and state are sound, and the manual."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import click

from slurm_tracker import __version__, health, pipeline, report
from slurm_tracker.cli import common, manual
from slurm_tracker.cli.common import (
    EXIT_CONFIG,
    api_client,
    config_from,
    config_option,
    emit,
    format_option,
    handles_errors,
    log_options,
    log_unexpected,
    main,
    parse_time,
    setup_logging,
    state_option,
    state_path_of,
)
from slurm_tracker.config import Config
from slurm_tracker.output import OutputFormat, View
from slurm_tracker.state import State
from slurm_tracker.times import utc_text


@main.command()
@config_option
@state_option
@format_option
@click.option(
    "--check",
    "as_check",
    is_flag=True,
    help="Monitoring plugin (Nagios/Icinga): one line with perfdata; exit 0 OK, 1 WARNING, "
    "2 CRITICAL, 3 UNKNOWN, by the thresholds of the config's `monitoring:` section.",
)
@click.option("--now", "now_at", metavar="RFC3339", callback=parse_time, hidden=True)
@log_options
def status(
    config_path: Optional[str],
    state_path: Optional[str],
    output: OutputFormat,
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
    output: OutputFormat,
    now_at: Optional[datetime],
    verbose: int,
    quiet: bool,
) -> None:
    """`status --check`: never a traceback, never an exit code outside 0-3."""
    setup_logging(verbose, quiet)
    now_at = now_at or pipeline.utc_now()
    try:
        config = config_from(config_path)
        result = health.check_state_file(
            state_path_of(config, state_path), config.monitoring.thresholds, now_at
        )
    except Exception as exc:
        log_unexpected(exc)
        result = health.unknown(f"{type(exc).__name__}: {exc}")
    emit(output, View(result.line, data=lambda: {"check": result.json()}, json_default=None))
    sys.exit(result.state)


@handles_errors
def _status(
    config_path: Optional[str],
    state_path: Optional[str],
    output: OutputFormat,
    now_at: Optional[datetime],
    verbose: int,
    quiet: bool,
) -> None:
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    now_at = now_at or pipeline.utc_now()
    path = state_path_of(config, state_path)
    with State.open(path, readonly=True) as store:
        info = report.status_info(store, now_at, config.limits.clock_skew_s)
        info["syncs"] = health.json_times(health.sync_history(store, path))
    info["check"] = health.check_state_file(path, config.monitoring.thresholds, now_at).json()
    emit(output, View(lambda: report.status_text(info), data=lambda: info, json_default=str))


@main.command()
@config_option
@state_option
@click.option("--online", is_flag=True, help="Also check the API key, allocations and SKUs.")
@format_option
@log_options
@handles_errors
def check(
    config_path: Optional[str],
    state_path: Optional[str],
    online: bool,
    output: OutputFormat,
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
    setup_logging(verbose, quiet)
    config = config_from(config_path)
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
    path = state_path_of(config, state_path)
    found += _check_state(config, path)
    if online:
        problems = pipeline.check_online(config, api_client(config))
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
    emit(
        output,
        View(
            lambda: "\n".join(
                f"{f['kind'] if f['status'] == 'valid' else f['status']:<11} "
                f"{report.printable(f['message'], 2000)}"
                for f in found
            ),
            data=lambda: {"ok": not bad, "checks": found},
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
        exit_status = (common.__doc__ or "").split("Exit codes:", 1)[-1]
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
            f"high-water mark {utc_text(mark)} is in the future: syncs would bill "
            "nothing; fix the clock, then `slurm-tracker state set-mark TIME`"
        )
        found.append({"kind": "state file", "status": "problem", "message": message})
    return found
