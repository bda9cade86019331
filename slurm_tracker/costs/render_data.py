"""The report as data: JSON (``--output json``) and CSV (``--output csv``).

Schema ``slurm-tracker.report/1`` (README, "Cost and utilisation report"). Numbers are rounded
to 6 decimal places; a utilisation is a fraction (0.25 = 25%) and null when unknown; costs are
null when nothing is priced (``currency`` null, ``measure`` "core-hours").
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Optional

from slurm_tracker.costs.intervals import instant
from slurm_tracker.costs.model import HOUR, UNALLOCATED, Report, Row
from slurm_tracker.costs.pricing import RESOURCES
from slurm_tracker.report_format import CsvWriter
from slurm_tracker.times import utc_text

SCHEMA = "slurm-tracker.report/1"
_Q = Decimal("0.000001")

CSV_COLUMNS = (
    "record",
    "group",
    "start",
    "end",
    "runs",
    "total_cost",
    "allocated_cost",
    "overhead_cost",
    "cpu_hours",
    "cpu_used_hours",
    "cpu_utilization",
    "mem_gb_hours",
    "mem_used_gb_hours",
    "mem_utilization",
    "gpu_hours",
    "gpu_used_hours",
    "gpu_utilization",
    "value",
    "hint",
)


def number(value: Optional[Decimal]) -> Optional[float]:
    if value is None:
        return None
    return float(value.quantize(_Q, rounding=ROUND_HALF_EVEN))


def rfc3339(seconds: int) -> str:
    return utc_text(instant(seconds))


def _used(used: Decimal, known: Decimal) -> Optional[Decimal]:
    return used / HOUR if known > 0 else None


def row_data(row: Row, report: Report) -> dict[str, Any]:
    priced = report.currency is not None
    return {
        "group": row.group,
        "runs": row.runs,
        "totalCost": number(row.total_cost) if priced else None,
        "allocatedCost": number(row.allocated_cost) if priced else None,
        "overheadCost": number(row.overhead) if priced else None,
        "allocatedCostByResource": (
            {r: number(row.allocated.get(r, Decimal(0))) for r in RESOURCES} if priced else None
        ),
        "wallHours": number(row.wall_s / HOUR),
        "cpuHours": number(row.cpu_s / HOUR),
        "cpuUsedHours": number(_used(row.cpu_used_s, row.cpu_known_s)),
        "cpuUtilization": number(row.cpu_util),
        "memGBHours": number(row.mem_gbs / HOUR),
        "memUsedGBHours": number(_used(row.mem_used_gbs, row.mem_known_gbs)),
        "memUtilization": number(row.mem_util),
        "gpuHours": number(row.gpu_s / HOUR),
        "gpuUsedHours": number(_used(row.gpu_used_s, row.gpu_known_s)),
        "gpuUtilization": number(row.gpu_util),
        "hint": row.hint,
    }


def as_json(report: Report, top: int) -> dict[str, Any]:
    totals = row_data(report.total, report)
    priced = report.currency is not None
    totals["unallocatedCost"] = number(report.unallocated_cost) if priced else None
    totals["grandTotalCost"] = (
        number(report.total.total_cost + report.unallocated_cost) if priced else None
    )
    series = []
    for index, values in enumerate(report.top_series(top)):
        low, high = report.grid.bounds(index)
        series.append(
            {
                "start": rfc3339(low),
                "end": rfc3339(high),
                "values": {group: number(value) for group, value in sorted(values.items())},
                "unallocated": number(report.unallocated[index]) if priced else None,
            }
        )
    return {
        "schema": SCHEMA,
        "period": {"start": rfc3339(report.start), "end": rfc3339(report.end)},
        "by": report.by,
        "intervalSeconds": report.grid.size,
        "currency": report.currency,
        "measure": report.measure,
        "top": top,
        "totals": totals,
        "rows": [row_data(row, report) for row in report.rows],
        "series": series,
        "rejected": report.rejected,
        "notes": list(report.notes),
    }


def _cell(value: object) -> str:
    """A CSV cell; text a spreadsheet would run as a formula (=, +, -, @) is quoted with '."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def as_csv(report: Report, top: int) -> str:
    """One table: a ``group`` record per group (and ``total``, ``unallocated``), then an
    ``interval`` record per interval and charted group (``value``: cost, else core-hours)."""
    out = io.StringIO()
    writer = CsvWriter(out)
    writer.writerow(CSV_COLUMNS)
    start, end = rfc3339(report.start), rfc3339(report.end)
    keys = (
        "runs", "totalCost", "allocatedCost", "overheadCost", "cpuHours", "cpuUsedHours",
        "cpuUtilization", "memGBHours", "memUsedGBHours", "memUtilization", "gpuHours",
        "gpuUsedHours", "gpuUtilization",
    )  # fmt: skip
    for kind, row in [*(("group", r) for r in report.rows), ("total", report.total)]:
        data = row_data(row, report)
        cells = [kind, data["group"], start, end, *(data[k] for k in keys), None, data["hint"]]
        writer.writerow([_cell(v) for v in cells])
    priced = report.currency is not None
    if priced:
        cost = number(report.unallocated_cost)
        writer.writerow(["unallocated", UNALLOCATED, start, end, "", cost])
    for index, values in enumerate(report.top_series(top)):
        low, high = (rfc3339(t) for t in report.grid.bounds(index))
        for group, value in sorted(values.items()):
            writer.writerow(["interval", _cell(group), low, high, *[""] * 13, number(value)])
        if priced and report.unallocated[index]:
            idle = number(report.unallocated[index])
            writer.writerow(["interval", UNALLOCATED, low, high, *[""] * 13, idle])
    return out.getvalue()


def write_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: a temporary file in the same
    directory, renamed over it; mode 0644 (a report is meant to be shared)."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
