"""Runs with what their steps used: the input of the cost and utilisation report.

The billing reader ignores steps; the report needs them. Records are framed exactly as the
billing reader frames them (:func:`slurm_tracker.parse.live_rows`: a fresh random delimiter,
exact field counts; saved files through :func:`slurm_tracker.parse.saved_rows`), and a damaged
record is counted as rejected, never fatal.

What is read, per run (one allocation record and the step records after it):

* **CPU used**: the sum of the steps' ``TotalCPU`` (user + system time, fractions of a second
  kept); the allocation's own ``TotalCPU`` when the run has no step records.
* **Memory requested**: ``AllocTRES`` mem (what Slurm reserved), else ``ReqTRES`` mem, else
  ``ReqMem``, whose ``c``/``n`` suffix (Slurm before 21.08) means per CPU / per node.
* **Memory used**: the peak over the steps of the step's memory. ``MaxRSS`` is the largest
  RSS of ONE task of the step, ``AveRSS`` the average over its tasks, so a step's memory is
  ``AveRSS x NTasks`` (the sum of its tasks' peaks) when it has several tasks, else
  ``MaxRSS``. RSS values are KiB unless suffixed (``K``, ``M``, ``G``, ``T``).
* **GPU used**: ``gres/gpuutil`` (percent, per task) of ``TRESUsageInAve``, on sites with NVML
  GPU accounting: GPU-seconds = utilisation / 100 x tasks x the step's elapsed seconds.
  Unknown (None, never 0) when no step reports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from slurm_tracker.models import MIB_PER_GB, JobRecord, Rejected
from slurm_tracker.parse import Row, parse_duration, parse_job_id, record_of_row

_MEM = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGTPkmgtp]?)")
_REQ_MEM = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGTPkmgtp]?)([cn]?)")
_MIB = {
    "K": Decimal(1) / Decimal(1024),
    "M": Decimal(1),
    "G": Decimal(1024),
    "T": Decimal(1024) ** 2,
    "P": Decimal(1024) ** 3,
}
_TRES_ITEM = re.compile(r"([A-Za-z][A-Za-z0-9_/:.\-]*)=(.*)")
_MAX_TASKS = 10_000_000
_BYTES_PER_MIB = Decimal(1024 * 1024)


@dataclass(frozen=True)
class RunUsage:
    """One run and what it used (None: not known, never taken as 0)."""

    record: JobRecord
    steps: int = 0
    cpu_used_s: Optional[Decimal] = None
    mem_requested_mb: Decimal = Decimal(0)
    mem_used_mb: Optional[Decimal] = None
    gpu_used_s: Optional[Decimal] = None
    nodes: tuple[str, ...] = ()

    @property
    def mem_allocated_gb(self) -> Decimal:
        """max(requested, used) memory, in GB (1024 MiB)."""
        used = self.mem_used_mb if self.mem_used_mb is not None else Decimal(0)
        return max(self.mem_requested_mb, used) / MIB_PER_GB


@dataclass(frozen=True)
class Usage:
    runs: tuple[RunUsage, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    orphan_steps: int = 0  # step records whose allocation record was not read


@dataclass
class _Steps:
    count: int = 0
    cpu_s: Optional[Decimal] = None
    mem_mb: Optional[Decimal] = None
    gpu_s: Optional[Decimal] = None

    def add(
        self, cpu_s: Optional[Decimal], mem_mb: Optional[Decimal], gpu_s: Optional[Decimal]
    ) -> None:
        self.count += 1
        if cpu_s is not None:
            self.cpu_s = cpu_s + (self.cpu_s or Decimal(0))
        if mem_mb is not None:
            self.mem_mb = mem_mb if self.mem_mb is None else max(self.mem_mb, mem_mb)
        if gpu_s is not None:
            self.gpu_s = gpu_s + (self.gpu_s or Decimal(0))


# --- field readers (None when empty or unreadable: unknown) ----------------------------------


def cpu_seconds(text: str) -> Optional[Decimal]:
    """Seconds of a TotalCPU value (``00:08.705``, ``1-02:03:04``, ``12:34:56.5``)."""
    stripped = text.strip()
    whole, _, fraction = stripped.partition(".")
    if fraction and not fraction.isdigit():
        return None
    try:
        seconds = parse_duration(whole)
    except ValueError:
        return None
    if seconds is None:
        return None
    return Decimal(seconds) + (Decimal("0." + fraction) if fraction else Decimal(0))


def memory_mb(text: str, bare: str = "K") -> Optional[Decimal]:
    """MiB of a memory value; a bare number is in ``bare`` units (KiB for RSS values)."""
    match = _MEM.fullmatch(text.strip())
    if match is None or len(text) > 40:
        return None
    unit = match.group(2).upper() or bare
    return Decimal(match.group(1)) * _MIB[unit]


def tres_items(text: str) -> dict[str, str]:
    """``cpu=00:00:06,mem=219476K,gres/gpuutil=87`` -> {name: value}; bad items skipped."""
    items: dict[str, str] = {}
    for item in text.split(","):
        match = _TRES_ITEM.fullmatch(item.strip())
        if match is not None:
            items.setdefault(match.group(1).lower(), match.group(2).strip())
    return items


def _count(text: str) -> Optional[int]:
    stripped = text.strip()
    if not stripped.isdigit() or len(stripped) > 9:
        return None
    return int(stripped)


def _decimal(text: str) -> Optional[Decimal]:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() and value >= 0 and len(text) < 30 else None


def requested_memory_mb(record: JobRecord, cells: Mapping[str, str]) -> Decimal:
    """What the run asked for: AllocTRES mem, else ReqTRES mem, else ReqMem (``Mc``: per CPU,
    ``Mn``: per node, Slurm before 21.08; no suffix: the whole job, 21.08 and later)."""
    if record.tres.mem_mb > 0:
        return record.tres.mem_mb
    req = memory_mb(tres_items(cells.get("ReqTRES", "")).get("mem", ""), "M")
    if req is not None and req > 0:
        return req
    match = _REQ_MEM.fullmatch(cells.get("ReqMem", "").strip())
    if match is None:
        return Decimal(0)
    amount = Decimal(match.group(1)) * _MIB[match.group(2).upper() or "M"]
    if match.group(3) == "c":
        cpus = record.tres.cpu or _count(cells.get("AllocCPUS", cells.get("NCPUS", ""))) or 0
        return amount * cpus
    if match.group(3) == "n":
        nodes = record.tres.node or _count(cells.get("NNodes", "")) or 1
        return amount * nodes
    return amount


def _step_figures(
    cells: Mapping[str, str],
) -> tuple[Optional[Decimal], Optional[Decimal], Optional[Decimal]]:
    """(CPU seconds, memory MiB, GPU-seconds) of one step record."""
    cpu_s = cpu_seconds(cells.get("TotalCPU", ""))
    tasks = _count(cells.get("NTasks", "")) or 1
    tasks = min(tasks, _MAX_TASKS)
    mem_mb = memory_mb(cells.get("MaxRSS", ""))
    average = memory_mb(cells.get("AveRSS", ""))
    if tasks > 1 and average is not None:
        mem_mb = average * tasks
    if mem_mb is None:
        mem_mb = memory_mb(tres_items(cells.get("TRESUsageInMax", "")).get("mem", ""))
    gpu_s: Optional[Decimal] = None
    util = _decimal(tres_items(cells.get("TRESUsageInAve", "")).get("gres/gpuutil", "x"))
    elapsed = _count(cells.get("ElapsedRaw", ""))
    if util is not None and elapsed is not None:
        gpu_s = util / 100 * tasks * elapsed
    return cpu_s, mem_mb, gpu_s


# --- assembling runs from rows ---------------------------------------------------------------


def expand_hostlist(text: str, limit: int = 100_000) -> tuple[str, ...]:
    """``node[01-03,07],gpu1`` -> node01, node02, node03, node07, gpu1 (at most ``limit``)."""
    names: list[str] = []
    for part in _split_top(text.strip()):
        names.extend(_expand_one(part, limit - len(names)))
        if len(names) >= limit:
            break
    return tuple(dict.fromkeys(n for n in names if n and n not in ("None", "(null)")))


def _split_top(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text):
        depth += 1 if char == "[" else -1 if char == "]" else 0
        if char == "," and depth == 0:
            yield text[start:index]
            start = index + 1
    yield text[start:]


def _expand_one(part: str, limit: int) -> list[str]:
    open_at = part.find("[")
    close_at = part.find("]", open_at)
    if open_at < 0 or close_at < 0 or limit <= 0:
        return [part]
    prefix, body, rest = part[:open_at], part[open_at + 1 : close_at], part[close_at + 1 :]
    tails = _expand_one(rest, limit) if "[" in rest else [rest]
    names: list[str] = []
    for item in body.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            return [part]
        width = len(low)
        for number in range(int(low), int(high or low) + 1):
            for tail in tails:
                names.append(f"{prefix}{number:0{width}d}{tail}")
                if len(names) >= limit:
                    return names
    return names


def _finish(record: JobRecord, cells: Mapping[str, str], steps: _Steps) -> RunUsage:
    cpu_s = steps.cpu_s if steps.count else cpu_seconds(cells.get("TotalCPU", ""))
    return RunUsage(
        record=record,
        steps=steps.count,
        cpu_used_s=cpu_s,
        mem_requested_mb=requested_memory_mb(record, cells),
        mem_used_mb=steps.mem_mb,
        gpu_used_s=steps.gpu_s,
        nodes=expand_hostlist(cells.get("NodeList", "")),
    )


def runs_from_rows(rows: Iterable[Row], *, cluster: str, tz: tzinfo) -> Usage:
    """Runs (with their steps) and rejected records of parsable rows, in input order.

    A step belongs to the allocation record before it with the same raw job id (sacct prints
    each allocation followed by its steps; with ``--duplicates`` a requeued run's steps follow
    that run's record).
    """
    runs: list[RunUsage] = []
    rejected: list[Rejected] = []
    orphans = 0
    current: Optional[tuple[JobRecord, Mapping[str, str], _Steps]] = None
    for row in rows:
        outcome = record_of_row(row, cluster=cluster, tz=tz)
        if isinstance(outcome, Rejected):
            rejected.append(outcome)
            continue
        if isinstance(outcome, JobRecord):
            if current is not None:
                runs.append(_finish(*current))
            current = (outcome, row.cells, _Steps())
            continue
        raw = row.cells.get("JobIDRaw", "") or row.cells.get("JobID", "")
        try:
            base = parse_job_id(raw).text.split(".", 1)[0]
        except ValueError:
            base = ""
        if current is None or base != current[0].job_id_raw.split(".", 1)[0]:
            orphans += 1
            continue
        current[2].add(*_step_figures(row.cells))
    if current is not None:
        runs.append(_finish(*current))
    return Usage(tuple(runs), tuple(rejected), orphans)


# --- sacct --json ----------------------------------------------------------------------------


def _number(value: Any) -> Optional[int]:
    if isinstance(value, dict):
        if value.get("set") is False or value.get("infinite") is True:
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _json_tres_count(items: Any, kind: str) -> Optional[int]:
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and item.get("type") == kind:
            return _number(item.get("count"))
    return None


def json_steps(job: Any) -> _Steps:
    """What the steps of one ``sacct --json`` job used (TRES usage mem counts are bytes)."""
    steps = _Steps()
    found = job.get("steps") if isinstance(job, dict) else None
    for step in found if isinstance(found, list) else []:
        if not isinstance(step, dict):
            continue
        total = step.get("time", {}).get("total") if isinstance(step.get("time"), dict) else None
        cpu_s: Optional[Decimal] = None
        if isinstance(total, dict):
            seconds, micro = _number(total.get("seconds")), _number(total.get("microseconds"))
            if seconds is not None:
                cpu_s = Decimal(seconds) + Decimal(micro or 0) / Decimal(1_000_000)
        usage = step.get("tres", {}).get("requested") if isinstance(step.get("tres"), dict) else {}
        usage = usage if isinstance(usage, dict) else {}
        task_info = step.get("tasks")
        tasks = _number(task_info.get("count") if isinstance(task_info, dict) else None) or 1
        peak = _json_tres_count(usage.get("max"), "mem")
        average = _json_tres_count(usage.get("average"), "mem")
        mem_bytes = average * tasks if tasks > 1 and average is not None else peak
        mem_mb = Decimal(mem_bytes) / _BYTES_PER_MIB if mem_bytes is not None else None
        steps.add(cpu_s, mem_mb, None)
    return steps


def runs_from_json(records: Iterable[JobRecord], jobs: list[Any]) -> list[RunUsage]:
    """Runs of parsed JSON records (``line`` is the job's index in ``jobs``, from 1)."""
    runs = []
    for record in records:
        job = jobs[record.line - 1] if 0 < record.line <= len(jobs) else {}
        steps = json_steps(job)
        usage = _finish(record, {"NodeList": record.extra.get("NodeList", "")}, steps)
        runs.append(replace(usage, cpu_used_s=steps.cpu_s))
    return runs
