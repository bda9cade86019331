"""The report for a terminal: the table of the top groups and a one-line cost bar chart."""

from __future__ import annotations

import unicodedata
from decimal import Decimal
from typing import Optional

from slurm_tracker.costs.intervals import instant
from slurm_tracker.costs.model import HOUR, UNALLOCATED, Report, Row

_BARS = "▁▂▃▄▅▆▇█"
_EMPTY = "·"
_NAME_WIDTH = 28
_MAX_BARS = 96
_BINS = (900, 3600, 86400, 7 * 86400)


def clean(text: str, width: int = _NAME_WIDTH) -> str:
    """User text (job names...) made safe for a terminal: no control characters, bounded."""
    safe = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in text)
    return safe if len(safe) <= width else safe[: width - 1] + "…"


def money(value: Optional[Decimal]) -> str:
    return "-" if value is None else f"{value:,.2f}"


def hours(value: Decimal) -> str:
    return f"{value:,.1f}"


def percent(value: Optional[Decimal]) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def period_text(report: Report) -> str:
    start, end = instant(report.start), instant(report.end)
    return f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"


def _cells(row: Row, report: Report) -> list[str]:
    priced = report.currency is not None
    return [
        clean(row.group),
        str(row.runs),
        money(row.total_cost if priced else None),
        money(row.allocated_cost if priced else None),
        money(row.overhead if priced else None),
        hours(row.cpu_s / HOUR),
        percent(row.cpu_util),
        hours(row.mem_gbs / HOUR),
        percent(row.mem_util),
        hours(row.gpu_s / HOUR),
        percent(row.gpu_util),
    ]


def as_text(report: Report, top: int) -> str:
    unit = report.currency or "no prices: costs not shown"
    lines = [
        f"Cost and utilisation by {report.by}, {period_text(report)} ({unit})",
        "",
    ]
    header = [
        report.by, "runs", "total", "allocated", "overhead", "core-h", "cpu%", "mem GB-h",
        "mem%", "GPU-h", "gpu%",
    ]  # fmt: skip
    shown, other = report.top(top)
    table = [header] + [_cells(r, report) for r in shown]
    if other is not None:
        table.append(_cells(other, report))
    table.append(_cells(report.total, report))
    if report.currency is not None and report.unallocated_cost:
        table.append([UNALLOCATED, "", money(report.unallocated_cost), *[""] * 8])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for number, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if number == 0 or number == len(shown) + (other is not None):
            lines.append("  ".join("-" * w for w in widths))
    if not report.rows:
        lines.append("(no job ran in this period)")
    hints = [r for r in shown if r.hint]
    if hints:
        lines += ["", "Right-sizing hints:"]
        lines += [f"  {clean(r.group)}: {r.hint}" for r in hints]
    lines += ["", *bar_line(report)]
    if report.rejected:
        lines.append(f"{report.rejected} sacct record(s) could not be read and were left out")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def bar_line(report: Report) -> list[str]:
    """One line of bars (per 15 min, hour, day or week: at most 96), empty bins as dots."""
    length = report.end - report.start
    size = next((s for s in _BINS if length / s <= _MAX_BARS), _BINS[-1])
    base = report.start - report.start % size
    count = (report.end - 1 - base) // size + 1 if length > 0 else 0
    totals = [Decimal(0)] * count
    for index, values in enumerate(report.series):
        low, _ = report.grid.bounds(index)
        value = sum(values.values(), Decimal(0))
        if report.currency is not None:
            value += report.unallocated[index]
        totals[(low - base) // size] += value
    top = max(totals, default=Decimal(0))
    if top <= 0:
        return [f"{report.measure} per bin: nothing in this period"]
    bars = "".join(
        _EMPTY if t <= 0 else _BARS[min(len(_BARS) - 1, int(t / top * len(_BARS)))] for t in totals
    )
    name = {900: "15 minutes", 3600: "hour", 86400: "day", 7 * 86400: "week"}[size]
    unit = report.currency or "core-hours"
    return [
        f"{report.measure} per {name} (max {money(top)} {unit}; {_EMPTY} = none):",
        f"  {bars}",
    ]
