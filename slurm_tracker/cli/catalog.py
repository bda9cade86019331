"""`catalog`: pull the rating catalog from the API into a file, show the rates in force."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import click

from slurm_tracker import pipeline, rating, report
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
)
from slurm_tracker.errors import ConfigError
from slurm_tracker.files import write_atomically
from slurm_tracker.output import OutputFormat, View


@main.group()
def catalog() -> None:
    """The rating catalog (units, SKUs, effective-dated rates) used by dry runs."""


@catalog.command("pull")
@config_option
@click.option(
    "--file",
    "file_path",
    metavar="PATH",
    help="Where to write the catalog (default: catalog_file from the config).",
)
@format_option
@log_options
@handles_errors
def catalog_pull(
    config_path: Optional[str],
    file_path: Optional[str],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """Read the organisation's units, SKUs and rate rules from the API into a YAML file.

    \b
    Examples:
      slurm-tracker catalog pull
      slurm-tracker catalog pull --file /etc/slurm-tracker/catalog.yaml
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    target = Path(file_path) if file_path else config.catalog_file
    if target is None:
        raise click.UsageError("pass --file PATH, or set catalog_file in the config")
    pulled = pipeline.pull_catalog(api_client(config), pipeline.utc_now())
    # 0644: rates are not secret, and dry runs by other admins read them; nobody else may
    # write the file (files.py refuses a catalog others can write).
    write_atomically(target, rating.dump_catalog(pulled).encode("utf-8"), mode=0o644)
    warnings = pipeline.catalog_warnings(config, pulled)
    emit(
        output,
        View(
            lambda: (
                f"catalog with {len(pulled.skus)} SKUs in {len(pulled.units)} units "
                f"written to {target}"
            ),
            data=lambda: {
                "file": str(target),
                "skus": len(pulled.skus),
                "units": len(pulled.units),
                "warnings": warnings,
            },
        ),
    )
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@catalog.command("show")
@config_option
@click.option(
    "--at",
    "at",
    metavar="RFC3339",
    callback=parse_time,
    help="Show the rates in force at this time (default: now).",
)
@rows_format_option
@log_options
@handles_errors
def catalog_show(
    config_path: Optional[str],
    at: Optional[datetime],
    output: OutputFormat,
    verbose: int,
    quiet: bool,
) -> None:
    """The rates in force per SKU, and their history.

    \b
    Examples:
      slurm-tracker catalog show
      slurm-tracker catalog show --at 2026-01-01 --output csv
    """
    setup_logging(verbose, quiet)
    config = config_from(config_path)
    current = pipeline.load_catalog(config)
    if current is None:
        raise ConfigError(config.source, ["no catalog: set catalog_file or a catalog section"])
    rates = rating.effective_rates(current, at or pipeline.utc_now())
    emit(output, View(lambda: report.rates_text(rates), data=lambda: report.rates_json(rates)))
