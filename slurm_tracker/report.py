"""Renders results for people (tables) and programs (JSON). Pure: returns text and dicts
(and writes a plan's JSON to a stream, batch by batch: :func:`write_plan_json`)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Optional, TextIO

from slurm_tracker.events import rfc3339
from slurm_tracker.health import age_text
from slurm_tracker.models import METRIC_UNITS, PlannedEvent, Rejected, Skipped
from slurm_tracker.pipeline import Plan, SyncResult, Total, Totals, Window
from slurm_tracker.rating import EffectiveRate, RateRule
from slurm_tracker.state import OutboxRow, QuarantineRow, State

LIST_LIMIT = 20  # rows of skipped/rejected shown without -v


def printable(text: str, limit: int = 300) -> str:
    """``text`` safe for a terminal: control characters escaped (job names and corrupt
    records may hold escape sequences), cut to ``limit`` characters."""
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _flat(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(inner, f"{prefix}.{key}" if prefix else str(key), into)
    elif isinstance(value, (list, tuple)):
        into[prefix] = json.dumps(value, default=str)
    elif isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        into[prefix] = "'" + value  # no spreadsheet runs a job name as a formula
    else:
        into[prefix] = "" if value is None else value


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(rows: Sequence[Any]) -> str:
    """CSV of JSON-like rows: one line per row, nested objects as dotted columns (``rated.usd``),
    lists as JSON text; the columns in the order they first appear. Text that a spreadsheet
    would run as a formula (``=``, ``+``, ``-``, ``@``...) starts with a quote."""
    flat: list[dict[str, Any]] = []
    for row in rows:
        into: dict[str, Any] = {}
        _flat(row if isinstance(row, dict) else {"value": row}, "", into)
        flat.append(into)
    columns = list(dict.fromkeys(k for row in flat for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return out.getvalue()


def rejected_json(rejected: Rejected) -> dict[str, Any]:
    return {
        "line": rejected.line,
        "reason": rejected.reason,
        "jobId": rejected.job_id or None,
        "run": rejected.run.text if rejected.run else None,
        "quarantineKey": rejected.key,
    }


def number(value: Optional[Decimal]) -> Optional[float]:
    """A JSON number for a 6-decimal Decimal (round-trips exactly through float's repr)."""
    return None if value is None else float(value)


def event_json(event: PlannedEvent) -> dict[str, Any]:
    rated = event.rated
    return {
        "allocation": event.allocation,
        "sku": event.sku,
        "quantity": number(event.quantity),
        "startedAt": rfc3339(event.started_at),
        "endedAt": rfc3339(event.ended_at),
        "user": event.user,
        "metadata": dict(event.metadata),
        "rated": None
        if rated is None
        else {"unit": rated.unit, "amount": number(rated.amount), "usd": number(rated.usd)},
    }


def total_json(total: Total) -> dict[str, Any]:
    return {
        "allocation": total.allocation,
        "sku": total.sku,
        "metric": total.metric,
        "events": total.events,
        "quantity": number(total.quantity),
        "unit": total.unit,
        "amount": number(total.amount),
        "usd": number(total.usd),
    }


def plan_json(plan: Plan, totals: Sequence[Total], window: Optional[Window]) -> dict[str, Any]:
    """The document of ``sync --dry-run --output json`` (see DESIGN.md)."""
    return {
        "window": None
        if window is None
        else {"start": rfc3339(window.start_at), "end": rfc3339(window.end_at)},
        "counts": {
            "records": plan.records,
            "events": len(plan.events),
            "skipped": len(plan.skipped),
            "rejected": len(plan.rejected),
            "held": len(plan.held),
            "stepsIgnored": plan.steps_ignored,
        },
        "events": [event_json(e) for e in plan.events],
        "skipped": [{"jobId": s.job_id, "reason": s.reason} for s in plan.skipped],
        "rejected": [rejected_json(r) for r in plan.rejected],
        "held": sorted(plan.held),
        "ratingProblems": list(plan.rating_problems),
        "totals": [total_json(t) for t in totals],
    }


def _fmt(value: Optional[Decimal], places: int = 6) -> str:
    if value is None:
        return "-"
    return f"{value:,.{places}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> str:
    """A plain aligned text table; columns whose index is in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


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
    verbose = summary.verbose
    if totals is None:
        totals = summary.totals.result()
    rejected = [*summary.read_rejected, *summary.plan_rejected]
    out: list[str] = []
    head = "Dry run (nothing written, nothing sent)" if dry_run else "Sync plan"
    span = f"window {rfc3339(window.start_at)} .. {rfc3339(window.end_at)}, " if window else ""
    out.append(f"{head}: {span}input {source}")
    out.append(
        f"{summary.records} job records: {summary.events} events planned, "
        f"{summary.skipped} skipped, {summary.rejected} rejected"
        + (f" ({summary.steps_ignored} step records ignored)" if summary.steps_ignored else "")
    )
    out.append("")
    if totals:
        rows = [
            [
                t.allocation,
                t.sku,
                METRIC_UNITS[t.metric],
                str(t.events),
                _fmt(t.quantity),
                _fmt(t.amount),
                t.unit or "-",
                _fmt(t.usd),
            ]
            for t in totals
        ]
        out.append(
            table(
                ["ALLOCATION", "SKU", "MEASURE", "EVENTS", "QUANTITY", "AMOUNT", "UNIT", "USD"],
                rows,
                right=(3, 4, 5, 7),
            )
        )
        out.append(_grand_total(totals))
    else:
        out.append("No usage to report.")
    if verbose and summary.all_events:
        out += ["", "Events:"]
        rows = [
            [
                e.allocation,
                e.sku,
                printable(str(e.metadata.get("jobId", "")), 40),
                printable(str(e.metadata.get("account", "")), 40),
                printable(str(e.metadata.get("partition", "")), 40),
                printable(e.user, 40),
                rfc3339(e.started_at),
                rfc3339(e.ended_at),
                _fmt(e.quantity),
                _fmt(e.rated.amount if e.rated else None),
                e.event_key,
            ]
            for e in summary.all_events
        ]
        out.append(
            table(
                [
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
                ],
                rows,
                right=(8, 9),
            )
        )
    if summary.rating_problems:
        out += ["", f"Not rated ({summary.rating_problems}): the catalog has no rate for:"]
        out += [f"  {p}" for p in _limit(summary.first_problems, verbose)]
    if summary.skipped:
        out += ["", f"Skipped ({summary.skipped}):"]
        if verbose:
            out += [f"  {printable(s.job_id)}: {printable(s.reason)}" for s in summary.all_skipped]
        else:
            out += [f"  {n:>6}  {kind}" for kind, n in summary.skip_kinds.most_common()]
    if summary.held:
        out += [
            "",
            f"Held ({len(summary.held)} events above limits.hold_above: stored as held, sent "
            "only after `slurm-tracker outbox release KEY`):",
        ]
        out += [f"  {printable(k)}" for k in _limit(sorted(summary.held), verbose)]
    if summary.rejected:
        out += [
            "",
            f"Rejected ({summary.rejected} malformed or implausible records, not billed; a "
            "sync quarantines them: `slurm-tracker quarantine list`):",
        ]
        out += [f"  line {r.line}: {printable(r.reason)}" for r in _limit(rejected, verbose)]
    hidden = (
        0
        if verbose
        else max(0, summary.rejected - LIST_LIMIT) + max(0, summary.rating_problems - LIST_LIMIT)
    )
    if hidden:
        out.append(f"  ... {hidden} more lines: use -v or --output json")
    return "\n".join(out)


@dataclass
class PlanSummary:
    """What the table of a plan shows, gathered batch by batch (see :func:`summarize`):
    counts, totals, and the first lines of each list (every line with ``verbose``)."""

    verbose: bool = False
    records: int = 0
    events: int = 0
    steps_ignored: int = 0
    skipped: int = 0
    skip_kinds: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    read_rejected: list[Rejected] = field(default_factory=list)  # the first ones (all: verbose)
    plan_rejected: list[Rejected] = field(default_factory=list)
    rating_problems: int = 0
    first_problems: list[str] = field(default_factory=list)
    held: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)
    all_events: list[PlannedEvent] = field(default_factory=list)  # verbose only
    all_skipped: list[Skipped] = field(default_factory=list)  # verbose only

    def add(self, plan: Plan) -> None:
        limit = None if self.verbose else LIST_LIMIT
        self.records += plan.records
        self.events += len(plan.events)
        self.steps_ignored += plan.steps_ignored
        self.skipped += len(plan.skipped)
        if self.verbose:
            self.all_events.extend(plan.events)
            self.all_skipped.extend(plan.skipped)
        else:
            self.skip_kinds.update(_reason_kind(s.reason) for s in plan.skipped)
        self.rejected += len(plan.rejected)
        read, planned = plan.rejected[: plan.read_rejected], plan.rejected[plan.read_rejected :]
        self.read_rejected.extend(read[: _room(self.read_rejected, limit)])
        self.plan_rejected.extend(planned[: _room(self.plan_rejected, limit)])
        self.rating_problems += len(plan.rating_problems)
        self.first_problems.extend(plan.rating_problems[: _room(self.first_problems, limit)])
        self.held.update(plan.held)
        self.totals.add(plan.events)


def _room(kept: Sequence[Any], limit: Optional[int]) -> Optional[int]:
    return None if limit is None else max(0, limit - len(kept))


def summarize(plans: Iterable[Plan], verbose: bool = False) -> PlanSummary:
    """The summary of the plans of one input (batches of it), consumed one by one."""
    summary = PlanSummary(verbose=verbose)
    for plan in plans:
        summary.add(plan)
    return summary


_ENCODE = json.encoder.encode_basestring_ascii  # json's own (C) string encoder
_C_ENCODE = json.JSONEncoder().encode  # json.dumps' C encoder (no indent)
_FLAT = frozenset({str, int})


def _json_value(value: Any, indent: str) -> str:
    """``value`` as ``json.dumps(value, indent=2)`` writes it at the depth of ``indent``."""
    kind = value.__class__
    if kind is str:
        return _ENCODE(value)
    if kind is dict:
        if not value:
            return "{}"
        inner = indent + "  "
        return (
            "{\n"
            + ",\n".join(
                inner + _ENCODE(key) + ": " + _json_value(item, inner)
                for key, item in value.items()
            )
            + "\n"
            + indent
            + "}"
        )
    if kind is list or kind is tuple:
        if not value:
            return "[]"
        inner = indent + "  "
        return (
            "[\n" + ",\n".join(inner + _json_value(v, inner) for v in value) + "\n" + indent + "]"
        )
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, indent=2, default=str).replace("\n", "\n" + indent)


def _event_text(event: PlannedEvent) -> str:
    """``_json_value(event_json(event), "    ")``, without the dict (an event of the "events"
    list; the same bytes, see test_streaming)."""
    rated = event.rated
    meta = event.metadata
    if meta.__class__ is dict and meta and _FLAT.issuperset(map(type, meta.values())):
        # json's C encoder writes a flat object of strings and ints on one line, items
        # separated by ', "' (a quote inside a string is escaped, so that is always between
        # items); one line per item is then a replace
        metadata = (
            '{\n        "' + _C_ENCODE(meta)[2:-1].replace(', "', ',\n        "') + "\n      }"
        )
    else:
        metadata = _json_value(dict(meta), "      ")
    return (
        '{\n      "allocation": '
        + _ENCODE(event.allocation)
        + ',\n      "sku": '
        + _ENCODE(event.sku)
        + ',\n      "quantity": '
        + _json_value(number(event.quantity), "      ")
        + ',\n      "startedAt": "'
        + rfc3339(event.started_at)
        + '",\n      "endedAt": "'
        + rfc3339(event.ended_at)
        + '",\n      "user": '
        + _ENCODE(event.user)
        + ',\n      "metadata": '
        + metadata
        + ',\n      "rated": '
        + (
            "null"
            if rated is None
            else '{\n        "unit": '
            + _ENCODE(rated.unit)
            + ',\n        "amount": '
            + _json_value(number(rated.amount), "        ")
            + ',\n        "usd": '
            + _json_value(number(rated.usd), "        ")
            + "\n      }"
        )
        + "\n    }"
    )


class _Spool:
    """Items of one JSON list, written as they come to a temporary file (in memory up to a
    few MB), copied into the document at the end."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by copy_to)
            max_size=4 << 20, mode="w+", encoding="utf-8"
        )
        self.count = 0

    def add(self, text: str) -> None:
        self.file.write((",\n    " if self.count else "    ") + text)
        self.count += 1

    def copy_to(self, out: TextIO) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out, 1 << 20)
        self.file.close()


def write_plan_json(plans: Iterable[Plan], window: Optional[Window], out: TextIO) -> None:
    """:func:`plan_json` as ``json.dumps(indent=2)`` prints it, plus a newline, byte for byte,
    written batch by batch: each event is encoded once as it comes (json's C string encoder,
    no document tree) to a spool, the counts and totals are written when every batch is in."""
    spools = {name: _Spool() for name in ("events", "skipped", "read", "rejected", "problems")}
    events, skipped = spools["events"], spools["skipped"]
    read, rejected, problems = spools["read"], spools["rejected"], spools["problems"]
    records = steps = 0
    held: set[str] = set()
    found = Totals()
    level = "    "
    for plan in plans:
        records += plan.records
        steps += plan.steps_ignored
        for event in plan.events:
            events.add(_event_text(event))
        for skip in plan.skipped:
            skipped.add(_json_value({"jobId": skip.job_id, "reason": skip.reason}, level))
        for index, refused in enumerate(plan.rejected):
            (read if index < plan.read_rejected else rejected).add(
                _json_value(rejected_json(refused), level)
            )
        for problem in plan.rating_problems:
            problems.add(_json_value(problem, level))
        held.update(plan.held)
        found.add(plan.events)
    head = {
        "window": None
        if window is None
        else {"start": rfc3339(window.start_at), "end": rfc3339(window.end_at)},
        "counts": {
            "records": records,
            "events": events.count,
            "skipped": skipped.count,
            "rejected": read.count + rejected.count,
            "held": len(held),
            "stepsIgnored": steps,
        },
    }
    out.write("{")
    for name, value in head.items():
        out.write(("\n  " if name == "window" else ",\n  ") + f'"{name}": ')
        out.write(_json_value(value, "  "))
    for name, parts in (
        ("events", [events]),
        ("skipped", [skipped]),
        ("rejected", [read, rejected]),
    ):
        _write_list(out, name, parts)
    out.write(',\n  "held": ' + _json_value(sorted(held), "  "))
    _write_list(out, "ratingProblems", [problems])
    out.write(',\n  "totals": ' + _json_value([total_json(t) for t in found.result()], "  "))
    out.write("\n}\n")


def _write_list(out: TextIO, name: str, parts: Sequence[_Spool]) -> None:
    out.write(f',\n  "{name}": ')
    if not any(p.count for p in parts):
        out.write("[]")
        for part in parts:
            part.file.close()
        return
    out.write("[\n")
    written = False
    for part in parts:
        if part.count:
            if written:
                out.write(",\n")
            part.copy_to(out)
            written = True
        else:
            part.file.close()
    out.write("\n  ]")


def _grand_total(totals: Sequence[Total]) -> str:
    """The line under the totals table: events in all, and USD where every event is rated in
    USD (quantities of different measures are not added up)."""
    events = sum(t.events for t in totals)
    usd = [t.usd for t in totals if t.usd is not None]
    line = f"total: {events} event{'s' if events != 1 else ''}"
    if usd:
        rated = sum(t.events for t in totals if t.usd is not None)
        line += f"; USD {_fmt(sum(usd, Decimal(0)))} (for the {rated} events rated in USD)"
    return line


def _limit(items: Sequence[Any], verbose: bool) -> Sequence[Any]:
    return items if verbose else items[:LIST_LIMIT]


def _reason_kind(reason: str) -> str:
    """Group skip reasons for the summary: the part before any per-job figures."""
    if reason.startswith("running:"):
        return "running, below the reporting interval"
    return reason.split(" (", 1)[0]


def sync_json(result: SyncResult) -> dict[str, Any]:
    d = result.delivery
    return {
        "outcome": result.outcome,
        "window": None
        if result.window is None
        else {"start": rfc3339(result.window.start_at), "end": rfc3339(result.window.end_at)},
        "planned": result.new_events,
        "posted": d.acked,
        "foundByLookup": d.found_by_lookup,
        "deadThisRun": d.dead,
        "pending": result.outbox.get("pending", 0) + result.outbox.get("sending", 0),
        "dead": result.outbox.get("dead", 0),
        "skipped": len(result.plan.skipped),
        "rejected": len(result.plan.rejected),
        "rejectedRecords": [rejected_json(r) for r in result.plan.rejected],
        "held": result.outbox.get("held", 0),
    }


def sync_summary(result: SyncResult, kind: str, seconds: float) -> tuple[int, str, dict[str, Any]]:
    """The one summary line of a sync or backfill: (logging level, message, fields)."""
    j = sync_json(result)
    window = j["window"]
    values: dict[str, Any] = {
        "kind": kind,
        "outcome": j["outcome"],
        "windowStart": window["start"] if window else None,
        "windowEnd": window["end"] if window else None,
        "records": result.plan.records,
        **{k: j[k] for k in ("planned", "posted", "pending", "held", "dead", "skipped")},
        "rejected": j["rejected"],
        "seconds": round(seconds, 3),
    }
    where = f"window {window['start']}..{window['end']}" if window else "saved input"
    message = (
        f"{kind} {j['outcome']} in {seconds:.1f} s: {where}, {values['records']} records, "
        f"{j['planned']} events planned, {j['posted']} posted, {j['pending']} pending, "
        f"{j['held']} held, {j['dead']} dead, {j['rejected']} rejected"
    )
    level = {"ok": logging.INFO, "undelivered": logging.WARNING}.get(j["outcome"], logging.ERROR)
    return level, message, values


def sync_text(result: SyncResult) -> str:
    j = sync_json(result)
    lines = [
        f"sync {j['outcome']}: {j['planned']} new events planned, {j['posted']} posted"
        + (
            f" ({j['foundByLookup']} already on the API, found by event key)"
            if j["foundByLookup"]
            else ""
        )
        + f", {j['pending']} pending, {j['held']} held, {j['dead']} dead; "
        f"{j['skipped']} runs skipped, {j['rejected']} records rejected (quarantined)",
    ]
    for r in result.plan.rejected[:LIST_LIMIT]:
        lines.append(f"  rejected line {r.line}: {printable(r.reason)}")
    if j["rejected"]:
        lines.append("  quarantined records: see `slurm-tracker quarantine list`")
    if j["held"]:
        lines.append(
            "  held events (above limits.hold_above): see `slurm-tracker outbox list --status "
            "held`, then `slurm-tracker outbox release KEY`"
        )
    if j["dead"]:
        lines.append("  dead-lettered events: see `slurm-tracker outbox list --status dead`")
    return "\n".join(lines)


def status_info(store: State, now_at: datetime, skew_s: int = 300) -> dict[str, Any]:
    """What `slurm-tracker status` reports, as plain values (from one State.status_snapshot)."""
    snap = store.status_snapshot((now_at - timedelta(days=1), now_at - timedelta(days=30)))
    high = snap.high_water_at
    last_day, last_30_days = (
        [{"allocation": a, "sku": s, "quantity": number(q), "events": n} for a, s, q, n in totals]
        for totals in snap.acked_since
    )
    last = snap.last_sync
    return {
        "stateFile": str(store.path),
        "highWaterMark": rfc3339(high) if high else None,
        "highWaterAgeSeconds": int((now_at - high).total_seconds()) if high else None,
        "highWaterInFuture": bool(high and high > now_at + timedelta(seconds=skew_s)),
        "quarantined": snap.quarantined,
        "openCorrections": snap.open_corrections,
        "outbox": snap.outbox,
        "oldestPending": rfc3339(snap.oldest_waiting_at) if snap.oldest_waiting_at else None,
        "reportedLastDay": last_day,
        "reportedLast30Days": last_30_days,
        "lastSync": None
        if last is None
        else {
            "startedAt": rfc3339(last["startedAt"]),
            "finishedAt": rfc3339(last["finishedAt"]),
            "outcome": last["outcome"],
            **last["summary"],
        },
    }


def status_text(info: dict[str, Any]) -> str:
    age = info["highWaterAgeSeconds"]
    out = [
        f"state file      {info['stateFile']}",
        "high-water mark "
        + (f"{info['highWaterMark']} ({age_text(age)} ago)" if age is not None else _no_mark(info)),
        "outbox          "
        + ", ".join(
            f"{n} {s}" for s, n in info["outbox"].items() if n or s in ("pending", "held", "dead")
        ),
    ]
    if info["highWaterInFuture"]:
        out.append(
            "                PROBLEM: the mark is in the future, so syncs bill nothing: fix the "
            "clock, then `slurm-tracker state set-mark TIME` (see README)"
        )
    if info["oldestPending"]:
        out.append(f"oldest pending  {info['oldestPending']}")
    if info["quarantined"]:
        out.append(
            f"quarantined     {info['quarantined']} records rejected and not billed: see "
            "`slurm-tracker quarantine list`"
        )
    if info["openCorrections"]:
        out.append(
            f"corrections     {info['openCorrections']} open: runs slurmdbd now says used less "
            "than was billed; see `slurm-tracker corrections list`"
        )
    last = info["lastSync"]
    if last and last["outcome"] in ("ok", "undelivered"):
        out.append(
            f"last sync       {last['finishedAt']}: {last['outcome']} "
            f"({last.get('posted', 0)} posted, {last.get('pending', 0)} pending, "
            f"{last.get('dead', 0)} dead)"
        )
    elif last:
        out.append(
            f"last sync       {last['finishedAt']}: {last['outcome']}"
            + (f" (exit {last['exitCode']})" if "exitCode" in last else "")
            + (f": {printable(str(last['reason']), 200)}" if last.get("reason") else "")
        )
    out += _health_lines(info)
    for title, key in (("last day", "reportedLastDay"), ("last 30 days", "reportedLast30Days")):
        rows = [
            [t["allocation"], t["sku"], str(t["events"]), f"{t['quantity']:.6f}"] for t in info[key]
        ]
        out += ["", f"Reported over the {title}:"]
        out.append(
            table(["ALLOCATION", "SKU", "EVENTS", "QUANTITY"], rows, (2, 3))
            if rows
            else "  nothing"
        )
    return "\n".join(out)


def _no_mark(info: dict[str, Any]) -> str:
    """Why there is no high-water mark: no sync at all, or none that read sacct live."""
    syncs = info.get("syncs") or {}
    if info["lastSync"] is None and not syncs.get("lastAttemptAt"):
        return "none (no sync yet)"
    if not syncs.get("lastSuccessAt"):
        return "none (no sync has succeeded yet)"
    return "none (no sync has read sacct live yet: only saved files)"


def _health_lines(info: dict[str, Any]) -> list[str]:
    """The last success, failures in a row (from `syncs`) and the check's verdict."""
    out: list[str] = []
    syncs = info.get("syncs") or {}
    failure = syncs.get("lastFailure")
    if syncs.get("failedSyncsInARow"):
        out.append(
            f"failed syncs    {syncs['failedSyncsInARow']} in a row; last success "
            f"{syncs.get('lastSuccessAt') or 'never'}"
        )
        if failure and failure["at"] != (info["lastSync"] or {}).get("finishedAt"):
            out.append(
                f"last failure    {failure['at']}: exit {failure['exitCode']}: "
                f"{printable(str(failure['reason']), 200)}"
            )
    check = info.get("check")
    if check:
        out.append(f"health          {check['state']} - {check['summary']}")
    return out


def outbox_json(row: OutboxRow) -> dict[str, Any]:
    return {
        "eventKey": row.event_key,
        "allocation": row.allocation,
        "sku": row.sku,
        "quantity": number(row.quantity),
        "status": row.status,
        "attempts": row.attempts,
        "lastError": row.last_error,
        "eventId": row.event_id,
        "createdAt": rfc3339(row.created_at),
        "updatedAt": rfc3339(row.updated_at),
    }


def outbox_text(rows: Sequence[OutboxRow]) -> str:
    if not rows:
        return "no events"
    return table(
        ["STATUS", "ALLOCATION", "SKU", "QUANTITY", "TRIES", "EVENT KEY", "LAST ERROR"],
        [
            [
                r.status,
                r.allocation,
                r.sku,
                f"{r.quantity:.6f}",
                str(r.attempts),
                r.event_key,
                printable(r.last_error, 200),
            ]
            for r in rows
        ],
        (3, 4),
    )


def quarantine_json(row: QuarantineRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "jobId": row.job_id,
        "reason": row.reason,
        "record": row.text,
        "firstSeenAt": rfc3339(row.first_seen_at),
        "lastSeenAt": rfc3339(row.last_seen_at),
        "timesSeen": row.times_seen,
        "resolvedAt": rfc3339(row.resolved_at) if row.resolved_at else None,
    }


def quarantine_text(rows: Sequence[QuarantineRow], verbose: bool = False) -> str:
    if not rows:
        return "no quarantined records"
    lines = [
        table(
            ["JOB", "FIRST SEEN", "LAST SEEN", "SEEN", "RESOLVED", "REASON"],
            [
                [
                    printable(r.job_id or "?", 40),
                    rfc3339(r.first_seen_at),
                    rfc3339(r.last_seen_at),
                    str(r.times_seen),
                    rfc3339(r.resolved_at) if r.resolved_at else "-",
                    printable(r.reason, 1000 if verbose else 120),
                ]
                for r in rows
            ],
            (3,),
        )
    ]
    if verbose:
        lines += ["", "Records as read:"]
        lines += [f"  {printable(r.job_id or r.key, 60)}: {printable(r.text, 1000)}" for r in rows]
    return "\n".join(lines)


def _rule_json(rule: RateRule) -> dict[str, Any]:
    return {
        "effectiveFrom": rfc3339(rule.effective_from_at),
        "effectiveTo": rfc3339(rule.effective_to_at) if rule.effective_to_at else None,
        "rate": number(rule.rate),
    }


def rates_json(rates: Sequence[EffectiveRate]) -> list[dict[str, Any]]:
    return [
        {
            "sku": r.sku,
            "unit": r.unit,
            "ratedInUsd": r.rated_in_usd,
            "archived": r.archived,
            "skuRate": number(r.sku_rate),
            "unitRate": number(r.unit_rate),
            "skuRules": [_rule_json(x) for x in r.sku_rules],
            "unitRules": [_rule_json(x) for x in r.unit_rules],
        }
        for r in rates
    ]


def rates_text(rates: Sequence[EffectiveRate]) -> str:
    def rate_text(value: Optional[Decimal], missing: str) -> str:
        return missing if value is None else f"{value.normalize():f}"

    rows = [
        [
            r.sku + (" (archived)" if r.archived else ""),
            r.unit,
            rate_text(r.sku_rate, "none in force"),
            rate_text(r.unit_rate, "none in force") if r.rated_in_usd else "-",
        ]
        for r in rates
    ]
    out = [table(["SKU", "UNIT", "UNITS PER QUANTITY", "USD PER UNIT"], rows, ())]
    for r in rates:
        history = [
            f"    {rfc3339(x.effective_from_at)} .. "
            f"{rfc3339(x.effective_to_at) if x.effective_to_at else 'open'}: {x.rate.normalize():f}"
            for x in r.sku_rules
        ]
        if history:
            out += ["", f"{r.sku} rate history:", *history]
    return "\n".join(out)
