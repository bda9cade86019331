"""The output of a live sync or backfill (its summary line, table and JSON) and of ``status``
(what the state file says, from one State.status_snapshot). Pure: text and dicts."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from slurm_tracker.events import rfc3339
from slurm_tracker.health import age_text
from slurm_tracker.pipeline import SyncResult
from slurm_tracker.report_format import number, printable, table
from slurm_tracker.report_plan import LIST_LIMIT
from slurm_tracker.report_plan_json import rejected_json
from slurm_tracker.state import State


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
