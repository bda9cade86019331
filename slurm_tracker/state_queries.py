"""What the state file tells about past syncs and what was billed: the recorded syncs, the
outbox's counts per status, acknowledged totals per hour and the cumulative totals (metrics)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Optional

from slurm_tracker.state_base import StateBase
from slurm_tracker.state_rows import epoch, from_epoch
from slurm_tracker.state_schema import STATUSES
from slurm_tracker.state_totals import PLANNED_TOTALS, POSTED_TOTALS


class QueriesMixin(StateBase):
    """Syncs, counts and totals (a mixin of :class:`state.State`)."""

    def record_sync(
        self, started_at: datetime, finished_at: datetime, outcome: str, summary: Mapping[str, Any]
    ) -> None:
        self._writable()
        with self._tx("record the sync") as cur:
            cur.execute(
                "INSERT INTO syncs (started_at, finished_at, outcome, summary) VALUES (?,?,?,?)",
                (epoch(started_at), epoch(finished_at), outcome, json.dumps(summary)),
            )
            cur.execute("DELETE FROM syncs WHERE id <= (SELECT max(id) FROM syncs) - 100")

    def last_sync(self) -> Optional[dict[str, Any]]:
        """The last recorded sync (see recent_syncs), or None before the first."""
        syncs = self.recent_syncs(1)
        return syncs[0] if syncs else None

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._query("SELECT status, count(*) FROM outbox GROUP BY status"):
            counts[status] = n
        return counts

    def totals_since(self, since_at: datetime) -> list[tuple[str, str, Decimal, int]]:
        """Acknowledged quantity and events per allocation and SKU since ``since_at``, to the
        hour (the hour holding ``since_at`` counts whole), over the last HOURS_KEPT hours."""
        if self._schema < 4:  # an older file opened read-only: from its acknowledged rows
            rows = self._query(
                "SELECT allocation, sku, 1, quantity FROM outbox "
                "WHERE status='acked' AND updated_at>=?",
                (epoch(since_at),),
            )
        else:
            rows = self._query(
                "SELECT allocation, sku, events, quantity FROM acked_hours WHERE hour >= ?",
                (epoch(since_at) // 3600,),
            )
        sums: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for allocation, sku, events, quantity in rows:
            q, n = sums.get((allocation, sku), (Decimal(0), 0))
            sums[(allocation, sku)] = (q + Decimal(quantity), n + int(events))
        return [(a, s, q, n) for (a, s), (q, n) in sorted(sums.items())]

    def recent_syncs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` recorded syncs, newest first (as last_sync gives one)."""
        rows = self._query(
            "SELECT started_at, finished_at, outcome, summary FROM syncs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            {
                "startedAt": from_epoch(started),
                "finishedAt": from_epoch(finished),
                "outcome": outcome,
                "summary": json.loads(summary),
            }
            for started, finished, outcome, summary in rows
        ]

    def posted_totals(self) -> dict[tuple[str, str], tuple[int, Decimal]]:
        """Cumulative (events, quantity) acknowledged per (allocation, SKU), counted as they
        are acknowledged: never lowered by pruning."""
        return self._totals("posted", POSTED_TOTALS)

    def waiting_by_sku(self) -> dict[tuple[str, str, str], int]:
        """Undelivered events per (status, allocation, SKU): pending, sending, held, dead."""
        rows = self._query(
            "SELECT status, allocation, sku, count(*) FROM outbox "
            "WHERE status IN ('pending', 'sending', 'held', 'dead') GROUP BY 1, 2, 3"
        )
        return {(status, a, s): n for status, a, s, n in rows}

    def planned_totals(self) -> dict[tuple[str, str], tuple[int, Decimal]]:
        """Cumulative (events, quantity) planned into the outbox per (allocation, SKU), counted
        as they are stored."""
        return self._totals("planned", PLANNED_TOTALS)

    def delivery_totals(self, kind: Literal["looked_up", "dead"]) -> dict[tuple[str, str], int]:
        """Cumulative events per (allocation, SKU) acknowledged because a look-up found them on
        the API (``looked_up``), or dead-lettered (``dead``; again after each retry)."""
        if self._schema < 4:
            return {}
        rows = self._query("SELECT allocation, sku, events FROM totals WHERE kind=?", (kind,))
        return {(a, s): int(n) for a, s, n in rows}

    def _totals(self, kind: str, older_name: str) -> dict[tuple[str, str], tuple[int, Decimal]]:
        if self._schema < 4:  # an older file opened read-only: as its last fold left them
            text = self._meta(older_name)
            data = json.loads(text) if text else {"totals": []}
            return {(a, s): (int(n), Decimal(q)) for a, s, n, q in data["totals"]}
        rows = self._query(
            "SELECT allocation, sku, events, quantity FROM totals WHERE kind=?", (kind,)
        )
        return {(a, s): (int(n), Decimal(q)) for a, s, n, q in rows}
