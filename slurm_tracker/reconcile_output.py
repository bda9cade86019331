"""The output of ``reconcile``: its JSON document (:func:`as_json`) and its table
(:func:`as_text`): findings, totals, the repair and what the API holds after it. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from slurm_tracker import report
from slurm_tracker.events import rfc3339
from slurm_tracker.reconcile_model import KINDS, Deletion, Finding, Report
from slurm_tracker.reconcile_repair import Applied, Repair


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "run": finding.run,
        "jobId": finding.job_id,
        "allocation": finding.allocation,
        "sku": finding.sku,
        "elapsedFrom": finding.from_s,
        "elapsedTo": finding.to_s,
        "quantity": report.number(finding.quantity),
        "keys": list(finding.keys),
        "detail": finding.detail,
    }


def _deletion_json(deletion: Deletion) -> dict[str, Any]:
    event = deletion.event
    return {
        "id": event.cost_id,
        "allocation": event.allocation,
        "eventKey": event.key,
        "quantity": report.number(event.quantity),
        "reason": deletion.reason,
    }


def as_json(
    result: Report,
    repair: Optional[Repair] = None,
    applied: Optional[Applied] = None,
    after: Optional[Report] = None,
) -> dict[str, Any]:
    """The document of ``reconcile --output json`` (``after``: the API read again after the
    repair)."""
    counts = {kind: sum(1 for f in result.findings if f.kind == kind) for kind in KINDS}
    doc: dict[str, Any] = {
        "window": {"start": rfc3339(result.window.start_at), "end": rfc3339(result.window.end_at)},
        "agent": result.agent,
        "runs": result.runs,
        "events": result.events,
        "oldAgentEvents": result.old_agent,
        "discrepancies": result.discrepancies,
        "counts": counts,
        "findings": [_finding_json(f) for f in result.findings],
        "notJudged": [{"jobId": j, "reason": r} for j, r in result.not_judged],
        "totals": [
            {
                "allocation": t.allocation,
                "sku": t.sku,
                "expected": report.number(t.expected),
                "billed": report.number(t.billed),
                "events": t.events,
            }
            for t in result.totals
        ],
    }
    if repair is not None:
        doc["repair"] = {
            "done": applied is not None,
            "delete": [_deletion_json(d) for d in repair.deletions],
            "post": [report.event_json(e) for e in repair.posts],
            "skipped": list(repair.skipped),
        }
        if applied is not None:
            doc["repair"]["deleted"] = applied.deleted
            doc["repair"]["posted"] = applied.delivery.acked
            doc["repair"]["undelivered"] = list(applied.undelivered)
    if after is not None:
        doc["after"] = as_json(after)
    return doc


def as_text(
    result: Report,
    repair: Optional[Repair] = None,
    applied: Optional[Applied] = None,
    after: Optional[Report] = None,
) -> str:
    """The table of ``reconcile``: findings, totals, the repair, what the API holds after it."""
    p = report.printable
    window = result.window
    lines = [
        f"reconcile {rfc3339(window.start_at)} .. {rfc3339(window.end_at)}: {result.runs} runs "
        f"judged, {result.events} events of this cluster read (this agent: {p(result.agent)})"
        + (
            f"; {result.old_agent} events of the old Go agent counted as billing"
            if result.old_agent
            else ""
        )
    ]
    if result.findings:
        lines += ["", _findings_table(result.findings)]
    lines += [f"not judged: job {p(j, 40)}: {p(why)}" for j, why in result.not_judged]
    if result.totals:
        rows = [
            [
                p(t.allocation, 40),
                p(t.sku, 40),
                f"{t.expected:.6f}",
                f"{t.billed:.6f}",
                f"{t.billed - t.expected:+.6f}",
                str(t.events),
            ]
            for t in result.totals
        ]
        headers = ["ALLOCATION", "SKU", "EXPECTED", "BILLED", "DIFFERENCE", "EVENTS"]
        lines += ["", report.table(headers, rows, right=[2, 3, 4, 5])]
    lines += ["", _summary(result)]
    if repair is not None:
        lines += ["", _repair_text(repair, applied)]
    if after is not None:
        lines += ["", f"after the repair, the API holds: {_summary(after)}"]
        if after.findings:
            lines.append(_findings_table(after.findings))
    return "\n".join(lines)


def _summary(result: Report) -> str:
    found = result.discrepancies
    notices = len(result.findings) - found
    others = f", {notices} event{'s' if notices != 1 else ''} of other agents" if notices else ""
    return f"{found} discrepanc{'y' if found == 1 else 'ies'}{others}"


def _findings_table(findings: Sequence[Finding]) -> str:
    p = report.printable
    rows = [
        [
            f.kind,
            p(f.job_id, 40),
            p(f.allocation, 40),
            p(f.sku, 40),
            f"{f.from_s}-{f.to_s}",
            f"{f.quantity:.6f}",
            p(f"{f.detail}: {', '.join(f.keys)}", 400),
        ]
        for f in findings
    ]
    headers = ["KIND", "JOB", "ALLOCATION", "SKU", "ELAPSED S", "QUANTITY", "DETAIL"]
    return report.table(headers, rows, right=[5])


def _repair_text(repair: Repair, applied: Optional[Applied]) -> str:
    p = report.printable
    verb = ("deleted", "posted") if applied else ("would delete", "would post")
    lines = [f"repair{'' if applied else ' (dry: pass --yes to do it)'}:"]
    for d in repair.deletions:
        lines.append(
            f"  {verb[0]} {p(d.event.key)} (id {p(d.event.cost_id, 60)}, "
            f"{p(d.event.allocation, 40)}): {p(d.reason)}"
        )
    for e in repair.posts:
        lines.append(f"  {verb[1]} {p(e.event_key)} to {p(e.allocation, 40)}: {e.quantity}")
    lines += [f"  {p(s)}" for s in repair.skipped]
    if not (repair.deletions or repair.posts or repair.skipped):
        lines.append("  nothing to do")
    if applied is not None:
        lines.append(
            f"  the API deleted {applied.deleted} of {len(repair.deletions)} events; "
            f"{applied.delivery.acked} events delivered"
        )
        lines += [f"  not delivered yet: {p(u)}" for u in applied.undelivered]
    return "\n".join(lines)
