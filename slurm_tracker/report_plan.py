"""The dry run's output for people and spreadsheets: the table of a plan (counts, totals, and
with ``-v`` every event, skip, problem and rejected record) and the CSV of its events.

Both are made batch by batch as the plan comes (:class:`PlanSummary`): the counts and totals in
memory, the lines to list in temporary files (report_spool), so that memory stays flat in the
number of events; :func:`write_plan_table` and :func:`write_plan_csv` then write them out.
:func:`plan_text` and :func:`summary_text` give the same table as one text. Pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from itertools import chain, islice
from typing import Any, Optional

from slurm_tracker.events import rfc3339
from slurm_tracker.inputs import Window
from slurm_tracker.models import METRIC_UNITS, PlannedEvent
from slurm_tracker.plans import Plan, Total, Totals
from slurm_tracker.report_format import (
    TextSink,
    fmt,
    printable,
    table,
    table_lines,
    write_csv,
)
from slurm_tracker.report_plan_json import event_json
from slurm_tracker.report_spool import SpooledItems

LIST_LIMIT = 20  # rows of skipped/rejected shown without -v

TOTAL_HEADERS = ("ALLOCATION", "SKU", "MEASURE", "EVENTS", "QUANTITY", "AMOUNT", "UNIT", "USD")
EVENT_HEADERS = (
    "ALLOCATION",
    "SKU",
    "JOB",
    "ACCOUNT",
    "PARTITION",
    "USER",
    "STARTED",
    "ENDED",
    "QUANTITY",
    "AMOUNT",
    "EVENT KEY",
)


class _Kept:
    """The lines of one list of the table: every one (``limit`` None) or the first ``limit``,
    kept in a temporary file as they come."""

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.items = SpooledItems()

    def extend(self, items: Iterable[Any]) -> None:
        room = None if self.limit is None else max(0, self.limit - len(self.items))
        for item in items if room is None else islice(items, room):
            self.items.append(item)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class PlanSummary:
    """What the table of a plan shows, gathered batch by batch (see :func:`summarize`):
    counts, totals, and the first lines of each list (every line with ``verbose``, the events
    as rows of cells with the widths of their columns), the lines kept in temporary files."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.records = self.events = self.steps_ignored = 0
        self.skipped = self.rejected = self.rating_problems = 0
        self.skip_kinds: Counter[str] = Counter()  # not verbose
        limit = None if verbose else LIST_LIMIT
        self.skip_lines = _Kept(limit if verbose else 0)  # verbose only
        self.read_rejected = _Kept(limit)  # lines of the records the reader refused
        self.plan_rejected = _Kept(limit)  # lines of those the planner refused
        self.first_problems = _Kept(limit)
        self.held: set[str] = set()
        self.totals = Totals()
        self.event_rows = _Kept(limit if verbose else 0)  # verbose only
        self.event_widths = [len(h) for h in EVENT_HEADERS]

    def add(self, plan: Plan) -> None:
        self.records += plan.records
        self.events += len(plan.events)
        self.steps_ignored += plan.steps_ignored
        self.skipped += len(plan.skipped)
        if self.verbose:
            self.event_rows.extend(map(self._event_row, plan.events))
            self.skip_lines.extend(
                f"  {printable(s.job_id)}: {printable(s.reason)}" for s in plan.skipped
            )
        else:
            self.skip_kinds.update(_reason_kind(s.reason) for s in plan.skipped)
        self.rejected += len(plan.rejected)
        read, planned = plan.rejected[: plan.read_rejected], plan.rejected[plan.read_rejected :]
        self.read_rejected.extend(f"  line {r.line}: {printable(r.reason)}" for r in read)
        self.plan_rejected.extend(f"  line {r.line}: {printable(r.reason)}" for r in planned)
        self.rating_problems += len(plan.rating_problems)
        self.first_problems.extend(f"  {p}" for p in plan.rating_problems)
        self.held.update(plan.held)
        self.totals.add(plan.events)

    def _event_row(self, e: PlannedEvent) -> list[str]:
        row = [
            e.allocation,
            e.sku,
            printable(str(e.metadata.get("jobId", "")), 40),
            printable(str(e.metadata.get("account", "")), 40),
            printable(str(e.metadata.get("partition", "")), 40),
            printable(e.user, 40),
            rfc3339(e.started_at),
            rfc3339(e.ended_at),
            fmt(e.quantity),
            fmt(e.rated.amount if e.rated else None),
            e.event_key,
        ]
        self.event_widths = [max(w, len(c)) for w, c in zip(self.event_widths, row)]
        return row

    def close(self) -> None:
        """Free the temporary files (the summary cannot be shown after)."""
        for kept in (
            self.skip_lines,
            self.read_rejected,
            self.plan_rejected,
            self.first_problems,
            self.event_rows,
        ):
            kept.items.close()


def summarize(plans: Iterable[Plan], verbose: bool = False) -> PlanSummary:
    """The summary of the plans of one input (batches of it), consumed one by one."""
    summary = PlanSummary(verbose=verbose)
    for plan in plans:
        summary.add(plan)
    return summary


def plan_text(
    plan: Plan,
    totals: Sequence[Total],
    window: Optional[Window],
    *,
    source: str,
    verbose: bool = False,
    dry_run: bool = True,
) -> str:
    """The human-readable summary of a planned sync."""
    summary = PlanSummary(verbose=verbose)
    summary.add(plan)
    return summary_text(summary, window, source=source, dry_run=dry_run, totals=totals)


def summary_text(
    summary: PlanSummary,
    window: Optional[Window],
    *,
    source: str,
    dry_run: bool = True,
    totals: Optional[Sequence[Total]] = None,
) -> str:
    """The human-readable summary of a planned sync, from its :class:`PlanSummary`."""
    return "\n".join(summary_lines(summary, window, source=source, dry_run=dry_run, totals=totals))


def write_plan_table(
    plans: Iterable[Plan],
    window: Optional[Window],
    out: TextSink,
    *,
    source: str,
    verbose: bool = False,
) -> None:
    """:func:`summary_text` of the plans, and a newline, written to ``out`` line by line in
    bounded memory (even with ``verbose``: every event's row is read back from a temporary
    file)."""
    summary = summarize(plans, verbose)
    try:
        for line in summary_lines(summary, window, source=source):
            out.write(line + "\n")
    finally:
        summary.close()


def write_plan_csv(plans: Iterable[Plan], out: TextSink) -> None:
    """The CSV of the events of the plans (``--output csv``: one row per event, as
    :func:`report_format.csv_text` makes it), written in bounded memory."""
    write_csv((event_json(e) for plan in plans for e in plan.events), out)


def summary_lines(
    summary: PlanSummary,
    window: Optional[Window],
    *,
    source: str,
    dry_run: bool = True,
    totals: Optional[Sequence[Total]] = None,
) -> Iterator[str]:
    """The lines of :func:`summary_text`, the long lists read back as they are written."""
    verbose = summary.verbose
    if totals is None:
        totals = summary.totals.result()
    head = "Dry run (nothing written, nothing sent)" if dry_run else "Sync plan"
    span = f"window {rfc3339(window.start_at)} .. {rfc3339(window.end_at)}, " if window else ""
    yield f"{head}: {span}input {source}"
    yield (
        f"{summary.records} job records: {summary.events} events planned, "
        f"{summary.skipped} skipped, {summary.rejected} rejected"
        + (f" ({summary.steps_ignored} step records ignored)" if summary.steps_ignored else "")
    )
    yield ""
    if totals:
        rows = [
            [
                t.allocation,
                t.sku,
                METRIC_UNITS[t.metric],
                str(t.events),
                fmt(t.quantity),
                fmt(t.amount),
                t.unit or "-",
                fmt(t.usd),
            ]
            for t in totals
        ]
        yield table(TOTAL_HEADERS, rows, right=(3, 4, 5, 7))
        yield _grand_total(totals)
    else:
        yield "No usage to report."
    if verbose and len(summary.event_rows):
        yield from ("", "Events:")
        yield from table_lines(EVENT_HEADERS, summary.event_rows, (8, 9), summary.event_widths)
    if summary.rating_problems:
        yield from ("", f"Not rated ({summary.rating_problems}): the catalog has no rate for:")
        yield from summary.first_problems
    if summary.skipped:
        yield from ("", f"Skipped ({summary.skipped}):")
        if verbose:
            yield from summary.skip_lines
        else:
            yield from (f"  {n:>6}  {kind}" for kind, n in summary.skip_kinds.most_common())
    if summary.held:
        yield from (
            "",
            f"Held ({len(summary.held)} events above limits.hold_above: stored as held, sent "
            "only after `slurm-tracker outbox release KEY`):",
        )
        yield from (f"  {printable(k)}" for k in _limit(sorted(summary.held), verbose))
    if summary.rejected:
        yield from (
            "",
            f"Rejected ({summary.rejected} malformed or implausible records, not billed; a "
            "sync quarantines them: `slurm-tracker quarantine list`):",
        )
        rejected = chain(summary.read_rejected, summary.plan_rejected)
        yield from (rejected if verbose else islice(rejected, LIST_LIMIT))
    hidden = (
        0
        if verbose
        else max(0, summary.rejected - LIST_LIMIT) + max(0, summary.rating_problems - LIST_LIMIT)
    )
    if hidden:
        yield f"  ... {hidden} more lines: use -v or --output json"


def _grand_total(totals: Sequence[Total]) -> str:
    """The line under the totals table: events in all, and USD where every event is rated in
    USD (quantities of different measures are not added up)."""
    events = sum(t.events for t in totals)
    usd = [t.usd for t in totals if t.usd is not None]
    line = f"total: {events} event{'s' if events != 1 else ''}"
    if usd:
        rated = sum(t.events for t in totals if t.usd is not None)
        line += f"; USD {fmt(sum(usd, Decimal(0)))} (for the {rated} events rated in USD)"
    return line


def _limit(items: Sequence[Any], verbose: bool) -> Sequence[Any]:
    return items if verbose else items[:LIST_LIMIT]


def _reason_kind(reason: str) -> str:
    """Group skip reasons for the summary: the part before any per-job figures."""
    if reason.startswith("running:"):
        return "running, below the reporting interval"
    return reason.split(" (", 1)[0]
