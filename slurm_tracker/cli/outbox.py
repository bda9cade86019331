"""`outbox`: see and deal with events the API refused (dead-lettered), holds back or has not
taken yet: list, retry, drop, release, replan."""

from __future__ import annotations

import sys
from typing import Optional

import click

from slurm_tracker import pipeline, replan, report
from slurm_tracker.cli.common import (
    EXIT_UNDELIVERED,
    api_client,
    config_from,
    config_option,
    emit,
    format_option,
    handles_errors,
    log_options,
    main,
    rows_format_option,
    setup_logging,
    state_option,
    state_path_of,
)
from slurm_tracker.output import OutputFormat, View
from slurm_tracker.state import State, StateLock


@main.group()
def outbox() -> None:
    """See and deal with events the API refused (dead-lettered) or has not taken yet."""


@outbox.command("list")
@config_option
@state_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["pending", "sending", "held", "acked", "dead", "dropped"]),
    help="Only these statuses (repeatable; default: pending, sending, held and dead).",
)
@rows_format_option
@log_options
@handles_errors
def outbox_list(
    config_path: Optional[str],
    state_path: Optional[str],
    statuses: tuple[str, ...],
    output: OutputFormat,
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
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    with State.open(state_path_of(config, state_path), readonly=True) as store:
        rows = store.outbox(statuses or ("pending", "sending", "held", "dead"))
    emit(
        output,
        View(lambda: report.outbox_text(rows), data=lambda: [report.outbox_json(r) for r in rows]),
    )


def _outbox_change(
    config_path: Optional[str],
    state_path: Optional[str],
    keys: tuple[str, ...],
    all_: bool,
    verb: str,
    output: OutputFormat,
) -> None:
    if not keys and not all_:
        raise click.UsageError(f"name the event keys to {verb}, or pass --all")
    config = config_from(config_path)
    path = state_path_of(config, state_path)
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
    emit(
        output,
        View(
            lambda: f"{count} event{'s' if count != 1 else ''} {done}",
            data=lambda: {"action": verb, "events": count},
        ),
    )


def _outbox_change_command(verb: str, help_text: str) -> None:
    """Register `outbox retry` or `outbox drop`: they differ only in what they do to a row."""

    @outbox.command(verb, help=help_text)
    @config_option
    @state_option
    @click.option(
        "--all",
        "all_",
        is_flag=True,
        help=f"Every {'held' if verb == 'release' else 'dead'} event.",
    )
    @click.argument("keys", nargs=-1)
    @format_option
    @log_options
    @handles_errors
    def command(
        config_path: Optional[str],
        state_path: Optional[str],
        all_: bool,
        keys: tuple[str, ...],
        output: OutputFormat,
        verbose: int,
        quiet: bool,
    ) -> None:
        setup_logging(verbose, quiet)
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
@config_option
@state_option
@click.option("--all", "all_", is_flag=True, help="Every dead event.")
@click.argument("keys", nargs=-1)
@format_option
@log_options
@handles_errors
def outbox_replan(
    config_path: Optional[str],
    state_path: Optional[str],
    all_: bool,
    keys: tuple[str, ...],
    output: OutputFormat,
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
    setup_logging(verbose, quiet)
    if not keys and not all_:
        raise click.UsageError("name the event keys to replan, or pass --all")
    config = config_from(config_path)
    path = state_path_of(config, state_path)
    now_at = pipeline.utc_now()
    client = api_client(config)
    with StateLock(path) as lock:
        lock.acquire(now_at)
        with State.open(path) as store:
            results = replan.replan(config, store, client, None if all_ else list(keys), now_at)
    emit(
        output,
        View(
            lambda: (
                "\n".join(f"{r.outcome:<10} {r.key}: {report.printable(r.detail)}" for r in results)
                or "no dead events to replan"
            ),
            data=lambda: [
                {"key": r.key, "outcome": r.outcome, "detail": r.detail} for r in results
            ],
        ),
    )
    if any(r.outcome == "refused" for r in results):
        sys.exit(EXIT_UNDELIVERED)
