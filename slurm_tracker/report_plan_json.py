"""The JSON of a plan (``sync --dry-run --output json``, DESIGN.md): the whole document as a
dict (:func:`plan_json`), or written batch by batch in bounded memory (:func:`write_plan_json`,
the same bytes as ``json.dumps(plan_json(...), indent=2)``). Also the JSON of one event, total
and rejected record, which other outputs (CSV, reconcile, corrections) share. Pure."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional, TextIO

from slurm_tracker.events import rfc3339
from slurm_tracker.inputs import Window
from slurm_tracker.models import PlannedEvent, Rejected
from slurm_tracker.plans import Plan, Total, Totals
from slurm_tracker.report_format import number
from slurm_tracker.report_spool import Spool


def rejected_json(rejected: Rejected) -> dict[str, Any]:
    return {
        "line": rejected.line,
        "reason": rejected.reason,
        "jobId": rejected.job_id or None,
        "run": rejected.run.text if rejected.run else None,
        "quarantineKey": rejected.key,
    }


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


def write_plan_json(plans: Iterable[Plan], window: Optional[Window], out: TextIO) -> None:
    """:func:`plan_json` as ``json.dumps(indent=2)`` prints it, plus a newline, byte for byte,
    written batch by batch: each event is encoded once as it comes (json's C string encoder,
    no document tree) to a spool, the counts and totals are written when every batch is in."""
    spools = {name: Spool() for name in ("events", "skipped", "read", "rejected", "problems")}
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


def _write_list(out: TextIO, name: str, parts: Sequence[Spool]) -> None:
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
