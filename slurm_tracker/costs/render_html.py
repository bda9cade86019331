"""The report as ONE self-contained HTML file: inline CSS and SVG, no script, no network.

The chart stacks, per interval, the cost of the top groups, "(other)" and "(unallocated)"
(or core-hours when nothing is priced). Colours are the Okabe-Ito palette (safe for the common
colour-vision deficiencies) and each series also has its own fill pattern, so the legend can
be matched without colour. Intervals without cost show a grey tick on the axis. Every text
that comes from sacct (group names are account, user or job names) is escaped, and the file
is well-formed XML (void elements closed), so it can be checked with an XML parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from html import escape

from slurm_tracker import __version__
from slurm_tracker.costs.intervals import instant
from slurm_tracker.costs.model import OTHER, UNALLOCATED, Report, Row
from slurm_tracker.costs.render_text import clean, hours, money, percent, period_text

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
OTHER_COLOUR = "#999999"
MAX_BARS = 800
WIDTH, PLOT_HEIGHT = 1000, 300
LEFT, RIGHT, TOP, AXIS = 80, 40, 20, 50
_LEGEND_ROW, _LEGEND_COLUMNS = 22, 3
_BINS = (900, 3600, 3 * 3600, 86400, 7 * 86400)
_TICKS = (900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400)
# pattern overlays (drawn on the series colour), one per series, in this order
_PATTERNS = (
    "",
    '<path d="M0,8 L8,0" stroke="{ink}" stroke-width="1.5"/>',
    '<path d="M0,0 L8,8" stroke="{ink}" stroke-width="1.5"/>',
    '<path d="M0,4 L8,4" stroke="{ink}" stroke-width="1.5"/>',
    '<path d="M4,0 L4,8" stroke="{ink}" stroke-width="1.5"/>',
    '<circle cx="4" cy="4" r="1.5" fill="{ink}"/>',
    '<path d="M0,4 L8,4 M4,0 L4,8" stroke="{ink}" stroke-width="1"/>',
    '<path d="M0,8 L8,0 M0,0 L8,8" stroke="{ink}" stroke-width="1"/>',
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}
p.meta{color:#444;margin:.2em 0 1em}
figure{margin:0 0 1.5em}
svg{max-width:100%;height:auto;font-size:12px}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th:first-child,td:first-child,td.hint{text-align:left}
td.hint{white-space:normal;max-width:30em;color:#8a3b00}
tr.total td{font-weight:bold;border-top:2px solid #444}
.notes{color:#555;font-size:.9em}
"""


def _fill(index: int, colour: str, ink: str = "") -> tuple[str, str]:
    """(pattern id, its <pattern> element) for series ``index`` in ``colour``."""
    ink = ink or ("#ffffff" if colour in ("#000000", "#0072B2", "#009E73") else "#000000")
    overlay = _PATTERNS[index % len(_PATTERNS)].format(ink=ink)
    pid = f"fill{index}"
    element = (
        f'<pattern id="{pid}" width="8" height="8" patternUnits="userSpaceOnUse">'
        f'<rect width="8" height="8" fill="{colour}"/>{overlay}</pattern>'
    )
    return pid, element


def _series_styles(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    styles = {}
    for index, name in enumerate(names):
        if name == UNALLOCATED:  # idle capacity: white, hatched in grey
            _, element = _fill(2, "#ffffff", "#aaaaaa")
            styles[name] = ("fill-idle", element.replace('id="fill2"', 'id="fill-idle"'))
        else:
            colour = OTHER_COLOUR if name == OTHER else OKABE_ITO[index % len(OKABE_ITO)]
            styles[name] = _fill(index, colour)
    return styles


def _nice(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    while magnitude > value:
        magnitude /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _bins(report: Report, top: int) -> tuple[int, list[tuple[int, int]], list[dict[str, Decimal]]]:
    """(bin size, bin bounds, values per bin) with at most MAX_BARS bins."""
    top_series = report.top_series(top)
    length = report.end - report.start
    size = next((s for s in _BINS if s >= report.grid.size and length / s <= MAX_BARS), _BINS[-1])
    base = report.start - report.start % size
    count = (report.end - 1 - base) // size + 1 if length > 0 else 0
    bounds = [
        (max(base + i * size, report.start), min(base + (i + 1) * size, report.end))
        for i in range(count)
    ]
    values: list[dict[str, Decimal]] = [{} for _ in range(count)]
    for index, series in enumerate(top_series):
        low, _ = report.grid.bounds(index)
        target = values[(low - base) // size]
        items = list(series.items())
        if report.currency is not None and report.unallocated[index]:
            items.append((UNALLOCATED, report.unallocated[index]))
        for name, value in items:
            target[name] = target.get(name, Decimal(0)) + value
    return size, bounds, values


def _bin_name(size: int) -> str:
    return {900: "15 minutes", 3600: "hour", 3 * 3600: "3 hours", 86400: "day"}.get(size, "week")


def chart(report: Report, top: int) -> str:
    """The SVG stacked bar chart."""
    size, bounds, values = _bins(report, top)
    shown = [r.group for r in report.rows[:top]]
    names = [*shown, *([OTHER] if len(report.rows) > top else []), UNALLOCATED]
    names = [n for n in names if n != UNALLOCATED or report.unallocated_cost > 0]
    styles = _series_styles(names)
    plot_w = WIDTH - LEFT - RIGHT
    legend_rows = (len(names) + _LEGEND_COLUMNS - 1) // _LEGEND_COLUMNS
    height = TOP + PLOT_HEIGHT + AXIS + 10 + legend_rows * _LEGEND_ROW
    peak = max((float(sum(v.values(), Decimal(0))) for v in values), default=0.0)
    y_max = _nice(peak)
    unit = report.currency or "core-hours"
    label = f"{'Cost' if report.currency else 'Core-hours'} per {_bin_name(size)} ({unit})"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" aria-label="{escape(label)}">',
        "<defs>" + "".join(styles[n][1] for n in names) + "</defs>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_HEIGHT}" fill="#fafafa"/>',
    ]
    baseline = TOP + PLOT_HEIGHT
    for step in range(6):  # y axis: 0 .. y_max in 5 steps
        value = y_max * step / 5
        y = baseline - PLOT_HEIGHT * step / 5
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e0e0e0"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,.6g}</text>')
    out.append(
        f'<text transform="translate(16 {TOP + PLOT_HEIGHT / 2}) rotate(-90)" '
        f'text-anchor="middle" class="axis-label">{escape(label)}</text>'
    )
    width = plot_w / max(len(bounds), 1)
    gap = 1.0 if width >= 4 else 0.0
    for number, ((low, high), stack) in enumerate(zip(bounds, values)):
        x = LEFT + number * width
        when = f"{instant(low):%Y-%m-%d %H:%M} to {instant(high):%H:%M} UTC"
        y = float(baseline)
        total = sum(stack.values(), Decimal(0))
        if total <= 0:
            out.append(
                f'<rect class="empty" data-bin="{number}" x="{x:.2f}" y="{baseline - 3}" '
                f'width="{max(width - gap, 0.5):.2f}" height="3" fill="#cccccc">'
                f"<title>{when}: nothing</title></rect>"
            )
            continue
        for name in names:
            amount = stack.get(name, Decimal(0))
            if amount <= 0:
                continue
            h = PLOT_HEIGHT * float(amount) / y_max
            y -= h
            out.append(
                f'<rect class="bar" data-bin="{number}" data-series="{escape(clean(name, 1000))}" '
                f'data-value="{float(amount):.6f}" x="{x:.2f}" y="{y:.2f}" '
                f'width="{max(width - gap, 0.5):.2f}" height="{h:.2f}" '
                f'fill="url(#{styles[name][0]})"><title>{escape(clean(name, 80))}: '
                f"{float(amount):,.4f} {escape(unit)}, {when}</title></rect>"
            )
    out += _x_axis(report, baseline)
    out += _legend(names, styles, report, top, baseline + AXIS + 10)
    out.append("</svg>")
    return "\n".join(out)


def _x_axis(report: Report, baseline: float) -> list[str]:
    length = max(report.end - report.start, 1)
    step = next((s for s in _TICKS if length / s <= 12), _TICKS[-1])
    plot_w = WIDTH - LEFT - RIGHT
    out = [
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{baseline}" y2="{baseline}" stroke="#333"/>'
    ]
    tick = report.start - report.start % step
    if tick < report.start:
        tick += step
    while tick <= report.end:
        x = LEFT + plot_w * (tick - report.start) / length
        text = f"{instant(tick):%m-%d %H:%M}" if step < 86400 else f"{instant(tick):%Y-%m-%d}"
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{baseline}" y2="{baseline + 5}" stroke="#333"/>'
        )
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{baseline + 18}" text-anchor="middle">{text}</text>'
        )
        tick += step
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{baseline + 38}" text-anchor="middle" '
        'class="axis-label">Time (UTC)</text>'
    )
    return out


def _legend(
    names: Sequence[str],
    styles: dict[str, tuple[str, str]],
    report: Report,
    count: int,
    top: float,
) -> list[str]:
    totals = {row.group: report.value(row) for row in report.rows}
    _, other = report.top(count)
    if other is not None:
        totals[OTHER] = report.value(other)
    totals[UNALLOCATED] = report.unallocated_cost
    column = (WIDTH - LEFT - RIGHT) / _LEGEND_COLUMNS
    out = ['<g class="legend">']
    for index, name in enumerate(names):
        x = LEFT + (index % _LEGEND_COLUMNS) * column
        y = top + (index // _LEGEND_COLUMNS) * _LEGEND_ROW
        out.append(
            f'<rect class="swatch" x="{x:.1f}" y="{y:.1f}" width="14" height="14" '
            f'fill="url(#{styles[name][0]})" stroke="#333"/>'
            f'<text class="legend-item" x="{x + 20:.1f}" y="{y + 12:.1f}">'
            f"{escape(clean(name, 30))} ({money(totals.get(name, Decimal(0)))})"
            f"<title>{escape(clean(name, 200))}</title></text>"
        )
    out.append("</g>")
    return out


def _row(row: Row, report: Report, kind: str = "") -> str:
    priced = report.currency is not None
    cells = [
        money(row.total_cost if priced else None),
        money(row.allocated_cost if priced else None),
        money(row.overhead if priced else None),
        f"{hours(row.cpu_s / 3600)}",
        percent(row.cpu_util),
        f"{hours(row.mem_gbs / 3600)}",
        percent(row.mem_util),
        f"{hours(row.gpu_s / 3600)}",
        percent(row.gpu_util),
    ]
    attributes = f' class="{kind}"' if kind else ""
    return (
        f"<tr{attributes}><td>{escape(clean(row.group, 60))}</td><td>{row.runs}</td>"
        + "".join(f"<td>{escape(c)}</td>" for c in cells)
        + f'<td class="hint">{escape(row.hint)}</td></tr>'
    )


def as_html(report: Report, top: int) -> str:
    title = f"Cost and utilisation by {report.by}"
    unit = report.currency or "no prices configured: core-hours"
    shown, other = report.top(top)
    rows = [_row(r, report) for r in shown]
    if other is not None:
        rows.append(_row(other, report))
    rows.append(_row(report.total, report, "total"))
    if report.currency is not None and report.unallocated_cost > 0:
        rows.append(
            f"<tr><td>{UNALLOCATED}</td><td></td><td>{money(report.unallocated_cost)}</td>"
            + "<td></td>" * 9
            + "</tr>"
        )
    head = "".join(
        f"<th>{escape(h)}</th>"
        for h in (report.by, "runs", "total cost", "allocated", "overhead", "core-hours",
                  "CPU used", "memory GB-hours", "memory used", "GPU-hours", "GPU used", "hint")
    )  # fmt: skip
    notes = [escape(n) for n in report.notes]
    if report.rejected:
        notes.insert(0, f"{report.rejected} sacct record(s) could not be read and were left out.")
    if not report.rows:
        notes.insert(0, "No job ran in this period.")
    notes_html = "".join(f"<li>{n}</li>" for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8"/>\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n"
        f'<p class="meta">Period: {escape(period_text(report))}. Unit: {escape(unit)}. '
        f"Groups: the top {top} by {escape(report.measure)}, the rest as {OTHER}.</p>\n"
        f"<figure>\n{chart(report, top)}\n</figure>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>\n"
        + (f'<ul class="notes">{notes_html}</ul>\n' if notes_html else "")
        + f'<p class="notes">Made by slurm-tracker {escape(__version__)} from sacct. '
        "Utilisation: used / allocated (CPU: TotalCPU; memory: peak RSS; GPU: gres/gpuutil); "
        "n/a = not recorded by slurmdbd.</p>\n</body>\n</html>\n"
    )
