"""`migrate`: switch from the older Go slurm-tracker: its JSON config to a YAML one, its
per-job progress into a new state file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click

from slurm_tracker import migrate_config, migrate_state
from slurm_tracker.cli.common import (
    EXIT_CONFIG,
    config_from,
    config_option,
    emit,
    fail,
    format_option,
    handles_errors,
    log_options,
    main,
    setup_logging,
    state_option,
    state_path_of,
)
from slurm_tracker.files import write_atomically
from slurm_tracker.output import OutputFormat, View


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
@log_options
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
    setup_logging(verbose, quiet)
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
@config_option
@state_option
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
@format_option
@log_options
@handles_errors
def migrate_state_command(
    old_state: str,
    config_path: Optional[str],
    state_path: Optional[str],
    dry_run: bool,
    sacct_file: Optional[str],
    skip: tuple[int, ...],
    output: OutputFormat,
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
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    migration, written = migrate_state.migrate(
        config,
        Path(old_state),
        state_path_of(config, state_path),
        dry_run=dry_run,
        sacct_file=sacct_file,
        stdin=sys.stdin.buffer,
        environ=os.environ,
        skip=skip,
    )
    emit(
        output,
        View(
            lambda: migrate_state.as_text(migration, written, dry_run),
            data=lambda: migrate_state.as_json(migration, written),
            json_default=None,
        ),
    )
    if migration.problems:
        fail(
            f"old agent state {old_state}: {len(migration.problems)} job id(s) cannot be "
            "carried over safely (listed above); nothing was written",
            EXIT_CONFIG,
        )
