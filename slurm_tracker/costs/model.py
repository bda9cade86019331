"""The cost and utilisation model (pure: plain values in, a Report out; no I/O, no clock).

Per run, over the part of it inside the period (a run occupies ``[Start, Start + ElapsedRaw)``,
so suspended time is not counted, as in billing):

* allocated CPU = CPUs x seconds; used = TotalCPU (x the share of the run inside the period);
* allocated memory = max(requested, peak used) x seconds; used = peak x seconds;
* allocated GPU = GPUs x seconds; used = GPU-seconds from ``gres/gpuutil`` when known;
* allocated cost = each resource's hourly price x its seconds / 3600, piece by piece, where a
  piece lies inside one 15-minute interval and one rate period;
* overhead (with node prices): per node and interval, node cost - the allocated cost of the
  runs on it (a run on k nodes puts 1/k of its cost on each), when positive, shared among those
  runs in proportion to their allocated cost (by their seconds when that is 0); a node without
  any run in an interval is "unallocated".

Each piece of cost is rounded once to 1e-12 (``QUANTUM``); totals are sums of the same pieces
as the bars, so they equal the sum of the bars exactly.
Without any price, the chart measures core-hours instead of cost (``Report.currency`` None).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Optional

from slurm_tracker.costs.intervals import Grid, epoch, instant
from slurm_tracker.costs.pricing import Prices
from slurm_tracker.costs.steps import RunUsage

OTHER = "(other)"
UNALLOCATED = "(unallocated)"
HOUR = Decimal(3600)
_ZERO = Decimal(0)
QUANTUM = Decimal("1e-12")  # every piece of cost is rounded to this once: sums are then exact
HINT_SHARE = Decimal("0.05")  # hints for groups with at least this share of the total
HINT_BELOW = Decimal("0.5")  # ... and a utilisation below this


@dataclass
class Row:
    """One group's sums. Seconds-based quantities; ``*_known_s`` are the allocated seconds of
    the runs whose usage is known (utilisation is used / allocated over those runs only)."""

    group: str
    runs: int = 0
    wall_s: Decimal = _ZERO
    allocated: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    overhead: Decimal = _ZERO
    cpu_s: Decimal = _ZERO
    cpu_used_s: Decimal = _ZERO
    cpu_known_s: Decimal = _ZERO
    mem_gbs: Decimal = _ZERO
    mem_used_gbs: Decimal = _ZERO
    mem_known_gbs: Decimal = _ZERO
    gpu_s: Decimal = _ZERO
    gpu_used_s: Decimal = _ZERO
    gpu_known_s: Decimal = _ZERO
    hint: str = ""

    @property
    def allocated_cost(self) -> Decimal:
        return sum(self.allocated.values(), _ZERO)

    @property
    def total_cost(self) -> Decimal:
        return self.allocated_cost + self.overhead

    @property
    def cpu_util(self) -> Optional[Decimal]:
        return _ratio(self.cpu_used_s, self.cpu_known_s)

    @property
    def mem_util(self) -> Optional[Decimal]:
        return _ratio(self.mem_used_gbs, self.mem_known_gbs)

    @property
    def gpu_util(self) -> Optional[Decimal]:
        return _ratio(self.gpu_used_s, self.gpu_known_s)

    def add(self, other: Row) -> None:
        self.runs += other.runs
        for name in (
            "wall_s", "overhead", "cpu_s", "cpu_used_s", "cpu_known_s", "mem_gbs",
            "mem_used_gbs", "mem_known_gbs", "gpu_s", "gpu_used_s", "gpu_known_s",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for resource, value in other.allocated.items():
            self.allocated[resource] += value


def _q(value: Decimal) -> Decimal:
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def _ratio(used: Decimal, allocated: Decimal) -> Optional[Decimal]:
    if allocated <= 0:
        return None
    return min(used / allocated, Decimal(1)) if used >= 0 else None


@dataclass(frozen=True)
class Report:
    start: int  # epoch seconds, UTC
    end: int
    by: str
    grid: Grid
    currency: Optional[str]  # None: nothing priced, the chart measures core-hours
    rows: tuple[Row, ...]  # every group, by total (cost, else core-hours) descending
    total: Row
    series: Sequence[dict[str, Decimal]]  # per interval: group -> value (cost or core-hours)
    unallocated: Sequence[Decimal]  # per interval: idle nodes' cost
    rejected: int = 0
    notes: tuple[str, ...] = ()

    @property
    def measure(self) -> str:
        return "cost" if self.currency is not None else "core-hours"

    @property
    def unallocated_cost(self) -> Decimal:
        return sum(self.unallocated, _ZERO)

    def value(self, row: Row) -> Decimal:
        """What rows are ranked and charted by."""
        return row.total_cost if self.currency is not None else row.cpu_s / HOUR

    def top(self, count: int) -> tuple[list[Row], Optional[Row]]:
        """The first ``count`` rows and the rest summed as one "(other)" row (None if none)."""
        if len(self.rows) <= count:
            return list(self.rows), None
        other = Row(OTHER)
        for row in self.rows[count:]:
            other.add(row)
        return list(self.rows[:count]), other

    def top_series(self, count: int) -> list[dict[str, Decimal]]:
        """The series with the groups after the first ``count`` summed as "(other)"."""
        shown = {row.group for row in self.rows[:count]}
        out = []
        for values in self.series:
            folded: dict[str, Decimal] = defaultdict(Decimal)
            for group, value in values.items():
                folded[group if group in shown else OTHER] += value
            out.append(dict(folded))
        return out


@dataclass
class _Run:
    usage: RunUsage
    group: str
    seconds: int
    costs: dict[int, Decimal] = field(default_factory=dict)  # interval -> allocated cost
    pieces: dict[int, int] = field(default_factory=dict)  # interval -> seconds
    overhead: dict[int, Decimal] = field(default_factory=lambda: defaultdict(Decimal))


def build(
    runs: Sequence[RunUsage],
    prices: Prices,
    group_of: Callable[[RunUsage], str],
    grid: Grid,
    *,
    by: str = "account",
    rejected: int = 0,
    notes: Sequence[str] = (),
) -> Report:
    """The report of ``runs`` over the grid's period."""
    rows: dict[str, Row] = {}
    measured: list[_Run] = []
    for usage in runs:
        run = _measure(usage, prices, group_of, grid, rows)
        if run is not None:
            measured.append(run)
    unallocated = _overhead(measured, prices, grid) if prices.has_nodes else [_ZERO] * len(grid)
    series: list[dict[str, Decimal]] = [defaultdict(Decimal) for _ in range(len(grid))]
    for run in measured:
        row = rows[run.group]
        for index, cost in run.costs.items():
            extra = run.overhead.get(index, _ZERO)
            row.overhead += extra
            if prices.currency is not None:
                series[index][run.group] += cost + extra
        if prices.currency is None:
            for index, seconds in run.pieces.items():
                series[index][run.group] += _q(run.usage.record.tres.cpu * seconds / HOUR)
    priced = prices.currency is not None
    ranked = sorted(
        rows.values(),
        key=lambda r: (-(r.total_cost if priced else r.cpu_s), r.group),
    )
    total = Row("(total)")
    for row in ranked:
        total.add(row)
    report = Report(
        start=grid.start,
        end=grid.end,
        by=by,
        grid=grid,
        currency=prices.currency,
        rows=tuple(ranked),
        total=total,
        series=[dict(values) for values in series],
        unallocated=unallocated,
        rejected=rejected,
        notes=(*notes, *prices.notes),
    )
    for row in ranked:
        row.hint = hint(row, report)
    return report


def _measure(
    usage: RunUsage,
    prices: Prices,
    group_of: Callable[[RunUsage], str],
    grid: Grid,
    rows: dict[str, Row],
) -> Optional[_Run]:
    record = usage.record
    if record.start_at is None:
        return None
    start = epoch(record.start_at)
    low, high = max(start, grid.start), min(start + record.elapsed_s, grid.end)
    if high <= low and not (record.elapsed_s == 0 and grid.start <= start < grid.end):
        return None
    seconds = max(0, high - low)
    group = group_of(usage)
    run = _Run(usage, group, seconds)
    row = rows.setdefault(group, Row(group))
    row.runs += 1
    row.wall_s += seconds
    share = Decimal(seconds) / record.elapsed_s if record.elapsed_s else _ZERO
    tres = record.tres
    row.cpu_s += tres.cpu * seconds
    if usage.cpu_used_s is not None and tres.cpu:
        row.cpu_used_s += usage.cpu_used_s * share
        row.cpu_known_s += tres.cpu * seconds
    mem_gb = usage.mem_allocated_gb
    row.mem_gbs += mem_gb * seconds
    if usage.mem_used_mb is not None and mem_gb:
        row.mem_used_gbs += usage.mem_used_mb / 1024 * seconds
        row.mem_known_gbs += mem_gb * seconds
    row.gpu_s += tres.gpu * seconds
    if usage.gpu_used_s is not None and tres.gpu:
        row.gpu_used_s += min(usage.gpu_used_s * share, Decimal(tres.gpu * seconds))
        row.gpu_known_s += tres.gpu * seconds
    for index, piece in grid.split(low, high):
        run.pieces[index] = piece
    if seconds:
        for span in prices.spans(usage, instant(low), instant(high)):
            for index, piece in grid.split(epoch(span.start_at), epoch(span.end_at)):
                for resource, per_hour in span.per_hour.items():
                    cost = _q(per_hour * piece / HOUR)
                    row.allocated[resource] += cost
                    run.costs[index] = run.costs.get(index, _ZERO) + cost
    for index in run.pieces:
        run.costs.setdefault(index, _ZERO)
    return run


def _overhead(runs: Sequence[_Run], prices: Prices, grid: Grid) -> list[Decimal]:
    """Share each priced node's unallocated cost, interval by interval; the idle nodes' cost
    per interval is returned."""
    on_node: dict[tuple[int, str], list[tuple[_Run, Decimal, int]]] = defaultdict(list)
    nodes = set(prices.known_nodes())
    for run in runs:
        names = [n for n in run.usage.nodes if prices.node_hour(n) is not None]
        count = len(run.usage.nodes) or 1
        for node in names:
            nodes.add(node)
            for index, seconds in run.pieces.items():
                on_node[(index, node)].append((run, run.costs.get(index, _ZERO) / count, seconds))
    idle = [_ZERO] * len(grid)
    for node in sorted(nodes):
        price = prices.node_hour(node)
        if price is None:
            continue
        for index in range(len(grid)):
            node_cost = _q(price * grid.seconds(index) / HOUR)
            present = on_node.get((index, node))
            if not present:
                idle[index] += node_cost
                continue
            allocated = sum((share for _, share, _ in present), _ZERO)
            left = node_cost - allocated
            if left <= 0:
                continue
            weights = [share for _, share, _ in present]
            if allocated <= 0:
                weights = [Decimal(seconds) for _, _, seconds in present]
            whole = sum(weights, _ZERO)
            for (run, _, _), weight in zip(present, weights):
                if whole > 0:
                    run.overhead[index] += _q(left * weight / whole)
    return idle


def hint(row: Row, report: Report) -> str:
    """A right-sizing hint when the group weighs at least 5% and uses less than half of what
    it asked for, e.g. "asked 32 cores, used 2.1 on average"."""
    whole = report.value(report.total)
    if whole <= 0 or report.value(row) < whole * HINT_SHARE or row.wall_s <= 0:
        return ""
    hints = []
    cpu = row.cpu_util
    if cpu is not None and cpu < HINT_BELOW and row.cpu_known_s > 0:
        asked = row.cpu_s / row.wall_s
        cores = _short(asked)
        plural = "" if cores == "1" else "s"
        hints.append(f"asked {cores} core{plural}, used {_short(asked * cpu)} on average")
    mem = row.mem_util
    if mem is not None and mem < HINT_BELOW and row.mem_known_gbs > 0:
        asked = row.mem_gbs / row.wall_s
        hints.append(f"asked {_short(asked)} GB memory, peak {_short(asked * mem)} GB")
    gpu = row.gpu_util
    if gpu is not None and gpu < HINT_BELOW:
        hints.append(f"GPUs {_short(gpu * 100)}% busy")
    return "; ".join(hints)


def _short(value: Decimal) -> str:
    """2.1, 32, 0.0046: whole numbers without decimals, small ones to 2 significant digits."""
    number = float(value)
    if number >= 10 or number == int(number):
        return f"{number:.0f}"
    return f"{number:.2g}" if number < 1 else f"{number:.1f}"
