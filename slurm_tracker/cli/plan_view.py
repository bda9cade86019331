"""How a dry run's plan is shown (`sync --dry-run`, `backfill --dry-run`): every format in
bounded memory, the plans of an input's batches consumed as they come."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional, TextIO, Union

import click

from slurm_tracker import pipeline, report
from slurm_tracker.cli.common import emit
from slurm_tracker.output import OutputFormat, View


def show_plan(
    plans: Union[pipeline.Plan, Iterable[pipeline.Plan]],
    window: Optional[pipeline.Window],
    source: str,
    output: OutputFormat,
    verbose: int,
) -> None:
    """Print a plan (or the plans of an input's batches, consumed as they come) in bounded
    memory, whatever the format: JSON event by event; the table (every event with -v) and CSV
    with their long lists kept in temporary files until the counts, widths and columns are
    known (report_plan), then written line by line."""
    batches = [plans] if isinstance(plans, pipeline.Plan) else plans
    emit(
        output,
        View(
            write_table=_echoed(
                lambda out: report.write_plan_table(
                    batches, window, out, source=source, verbose=verbose > 0
                )
            ),
            write_json=lambda out: report.write_plan_json(batches, window, out),
            write_csv=_echoed(lambda out: report.write_plan_csv(batches, out)),
        ),
    )


class _Echo:
    """A text sink that prints through click.echo, as emit prints a whole text (so escape
    sequences are stripped when stdout is no terminal, as they always were), in blocks of
    whole writes (a line or a CSV row: no escape sequence spans two blocks)."""

    def __init__(self, out: TextIO, block: int = 1 << 16) -> None:
        self.out = out
        self.block = block
        self.parts: list[str] = []
        self.size = 0

    def write(self, text: str, /) -> int:
        self.parts.append(text)
        self.size += len(text)
        if self.size >= self.block:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self.parts:
            click.echo("".join(self.parts), file=self.out, nl=False)
            self.parts, self.size = [], 0


def _echoed(write: Callable[[_Echo], None]) -> Callable[[TextIO], None]:
    """``write`` (a streaming writer) printing to the stream emit gives it through click.echo."""

    def run(out: TextIO) -> None:
        sink = _Echo(out)
        write(sink)
        sink.flush()

    return run
