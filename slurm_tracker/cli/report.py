"""`report`: cost and utilisation of the jobs of a period (slurm_tracker.costs).

The costs modules are imported inside the command, on purpose: the cron-run commands (sync,
backfill, status --check) never load them.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import click

from slurm_tracker import pipeline
from slurm_tracker.cli.common import (
    config_from,
    config_option,
    emit,
    handles_errors,
    log_options,
    main,
    output_option,
    parse_time,
    setup_logging,
)
from slurm_tracker.output import OutputFormat, View

REPORT_DEFAULT_DAYS = 7


@main.command("report")
@config_option
@click.option(
    "--start",
    metavar="TIME",
    callback=parse_time,
    help=f"Start of the period (a date or RFC 3339 time, UTC; default: {REPORT_DEFAULT_DAYS} "
    "days before --end).",
)
@click.option(
    "--end", metavar="TIME", callback=parse_time, help="End (exclusive), UTC (default: now)."
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
@output_option(*OutputFormat)
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
@log_options
@handles_errors
def report_command(
    config_path: Optional[str],
    start: Optional[datetime],
    end: Optional[datetime],
    by: str,
    top: int,
    output: OutputFormat,
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

    setup_logging(verbose, quiet)
    now_at = pipeline.utc_now().replace(microsecond=0)
    end_at = min(end or now_at, now_at)  # the future has no usage (and idle nodes no cost yet)
    start_at = start or end_at - timedelta(days=REPORT_DEFAULT_DAYS)
    if start_at >= now_at:
        raise click.BadParameter("is in the future: nothing ran yet", param_hint="--start")
    if end_at <= start_at:
        raise click.BadParameter("--end must be after --start", param_hint="--end")
    config = config_from(config_path)
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
    view = View(
        lambda: render_text.as_text(made, top),  # whole lines: nothing to add
        data=lambda: render_data.as_json(made, top),
        json_default=None,
        csv=lambda: render_data.as_csv(made, top),
        html=lambda: render_html.as_html(made, top),
        table_end="",
    )
    if file_path is None:
        emit(output, view)
        return
    render_data.write_file(Path(file_path), output.renderer.text(view))
    if not quiet:
        click.echo(f"slurm-tracker: report written to {file_path}", err=True)
