"""The rows of ``outbox list``, ``quarantine list`` and ``catalog show``: one JSON object per
row, and the table. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Optional

from slurm_tracker.events import rfc3339
from slurm_tracker.rating import EffectiveRate, RateRule
from slurm_tracker.report_format import number, printable, table
from slurm_tracker.state import OutboxRow, QuarantineRow


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
