"""What every command shares: the `main` group, the exit codes, error handling, logging, the
common options and the config, state and API client they lead to.

Exit codes: 0 ok; 1 runtime failure; 2 usage error; 3 invalid configuration or state file
(or an unsafe file, or a high-water mark in the future); 4 some events dead-lettered, held or
still pending; 5 another agent bills this cluster; 6 reconcile found discrepancies; 75 temporary
failure (cron: just try again).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import click
from dateutil import parser as dateparser

from slurm_tracker import __version__, api, logs
from slurm_tracker.config import Config, load_config, resolve_config_path
from slurm_tracker.errors import (
    ConfigError,
    InputError,
    StateError,
    TemporaryFailure,
    TrackerError,
    UnsafeFile,
    WriterConflict,
)
from slurm_tracker.output import OutputFormat, View

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNDELIVERED = 4
EXIT_WRITER_CONFLICT = 5  # another agent bills this cluster
EXIT_DISCREPANCIES = 6  # reconcile found discrepancies between slurmdbd and the API
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL from sysexits.h

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slurm-tracker")
def main() -> None:
    """Bill Slurm job usage to the Allocations API, exactly once.

    Run `slurm-tracker sync` from cron or a systemd timer every few minutes;
    `slurm-tracker sync --dry-run` shows what would be sent, without sending or writing anything.
    `slurm-tracker help` prints the whole manual (`help --man`: as a man page). Shell completion:
    see the README, section "Shell completion".
    """


def setup_logging(verbose: int, quiet: bool) -> None:
    """Logging for this command: -v/-q, and --log-format/--syslog kept by log_options."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    logs.setup(
        verbose,
        quiet,
        log_format=meta.get("slurm_tracker.log_format"),
        syslog=bool(meta.get("slurm_tracker.syslog")),
    )


def fail(message: str, code: int) -> None:
    logs.failure(message, code)
    sys.exit(code)


#: OS errors of the environment rather than of the input: full disk or quota, read-only file
#: system, I/O error. Nothing is lost; the next run continues where this one stopped.
TEMPORARY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


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
            code = exit_code(exc)
            temporary = " (temporary: the next run will try again)" if code == EXIT_TEMPFAIL else ""
            fail(f"{exc}{temporary}", code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            if exc.errno in TEMPORARY_ERRNOS:
                fail(
                    f"{exc.strerror or exc}{where}: nothing was lost (temporary: the next run "
                    "will try again once this is fixed)",
                    EXIT_TEMPFAIL,
                )
            log_unexpected(exc)
            fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
        except Exception as exc:
            log_unexpected(exc)
            fail(
                f"unexpected {type(exc).__name__}: {one_line(str(exc))} (run again with -vv "
                "for the details, and please report it)",
                EXIT_FAILURE,
            )
        return None

    return cast(F, wrapper)


def exit_code(exc: TrackerError) -> int:
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


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 200 else line[:200] + "..."


def log_unexpected(exc: BaseException) -> None:
    logging.getLogger("slurm_tracker").debug("details", exc_info=exc)


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """Keep a logging option for setup_logging (not passed to the command function)."""
    ctx.meta[f"slurm_tracker.{param.name}"] = value
    return value


def log_options(func: F) -> F:
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


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        metavar="PATH",
        help="Config file (default: $SLURM_TRACKER_CONFIG, else /etc/slurm-tracker/config.yaml).",
    )(func)


def emit(output: OutputFormat, view: View) -> None:
    """Print ``view`` in the format ``output`` (see output.py): its renderer's text through
    click.echo, or, where the renderer writes as it goes, straight to stdout."""
    renderer = output.renderer
    writer = renderer.writer(view)
    if writer is None:
        click.echo(renderer.text(view), nl=False)
        return
    writer(sys.stdout)
    sys.stdout.flush()


def output_option(*formats: OutputFormat, help: Optional[str] = None) -> Callable[[F], F]:
    """``--output`` offering ``formats`` (table by default); the command gets an OutputFormat."""
    return click.option(
        "--output",
        type=click.Choice([f.value for f in formats]),
        default=OutputFormat.TABLE.value,
        show_default=True,
        callback=_to_format,
        help=help,
    )


def _to_format(_ctx: click.Context, _param: click.Parameter, value: str) -> OutputFormat:
    return OutputFormat(value)


state_option = click.option(
    "--state", "state_path", metavar="PATH", help="State file (default: from the config)."
)
#: --output of a command with one result: table or json
format_option = output_option(
    OutputFormat.TABLE, OutputFormat.JSON, help="For people (table) or programs (json)."
)
#: --output of a command that lists rows: table, json or csv
rows_format_option = output_option(
    OutputFormat.TABLE,
    OutputFormat.JSON,
    OutputFormat.CSV,
    help="For people (table) or programs (json; csv: one row per item, nested fields as "
    "dotted columns).",
)


def parse_time(
    _ctx: click.Context, _param: click.Parameter, value: Optional[str]
) -> Optional[datetime]:
    """A click callback: an RFC 3339 time (or a date), as UTC; no zone means UTC."""
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


def config_from(config_path: Optional[str]) -> Config:
    return load_config(resolve_config_path(config_path, os.environ))


def state_path_of(config: Config, state_path: Optional[str]) -> Path:
    return Path(state_path) if state_path else config.state_file


def api_client(config: Config) -> api.AllocationsClient:
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
