"""The outbox of the state file: the events to send, their statuses, and what a delivery,
an operator (retry, drop, release, replan) or a repair records about them.

Statuses (:class:`statuses.OutboxStatus`): ``pending`` -> ``sending`` (marked, committed,
before any POST) -> ``acked`` (its request body dropped: the API has it), ``dead`` or back to
``pending``; ``held`` until released; ``dropped`` for the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Optional

from slurm_tracker.state_base import StateBase
from slurm_tracker.state_rows import OutboxRow, OutboxUpdate, epoch, from_epoch, outbox_row
from slurm_tracker.state_schema import OUTBOX_COLUMNS, STATUSES
from slurm_tracker.state_totals import add_counts, chunks, count_acked, count_kind, counted, marks
from slurm_tracker.statuses import TO_SEND, OutboxStatus

#: An acknowledgement: the row is written again without its request body (the API has it),
#: at the end of the table (a new rowid; REPLACE deletes the old row), so that acknowledged
#: rows lie packed together and the pages of the bodies they had empty out whole and are reused
#: (a row shrunk in place would leave its page two thirds empty until it is pruned).
_ACK = f"""INSERT OR REPLACE INTO outbox ({OUTBOX_COLUMNS})
    SELECT event_key, allocation, sku, quantity, started_at, ended_at, '', 'acked',
           max(0, attempts + ?), max(outcome_unknown, ?), '', coalesce(?, event_id),
           created_at, ?
    FROM outbox WHERE event_key=?"""


class OutboxMixin(StateBase):
    """The outbox (a mixin of :class:`state.State`)."""

    def outbox(
        self, statuses: Sequence[str] = STATUSES, limit: Optional[int] = None
    ) -> list[OutboxRow]:
        sql = (
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE status IN ({marks(statuses)}) "
            "ORDER BY created_at, event_key"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [outbox_row(r) for r in self._query(sql, tuple(statuses))]

    def to_send(self) -> list[OutboxRow]:
        """Events not yet acknowledged, not dead and not held, oldest first."""
        return self.outbox(TO_SEND)

    def oldest_waiting_at(self) -> Optional[datetime]:
        """When the oldest event to send (pending or sending) was stored; None when none is."""
        rows = self._query(
            "SELECT min(created_at) FROM outbox WHERE status IN ('pending', 'sending')"
        )
        return from_epoch(rows[0][0])

    def to_send_from(self, position: int, limit: int) -> tuple[list[OutboxRow], int]:
        """Up to ``limit`` events to send (pending or sending) stored after ``position`` (0:
        from the first), in the order they were stored, and the position to go on from.

        A delivery pass walks the outbox with it one batch at a time, whatever the backlog's
        size: the walk reads the table once (by rowid), and rows whose status changes during
        the walk keep their place."""
        rows = self._query(
            f"SELECT rowid, {OUTBOX_COLUMNS} FROM outbox "
            "WHERE rowid > ? AND status IN ('pending', 'sending') ORDER BY rowid LIMIT ?",
            (position, int(limit)),
        )
        if not rows:
            return [], position
        return [outbox_row(r[1:]) for r in rows], int(rows[-1][0])

    def _set(self, key: str, now_at: datetime, sql: str, params: Sequence[Any]) -> None:
        self._writable()
        with self._tx(f"record the outcome of event {key}") as cur:
            cur.execute(
                f"UPDATE outbox SET {sql}, updated_at=? WHERE event_key=?",
                (*params, epoch(now_at), key),
            )

    def mark_sending(self, key: str, now_at: datetime) -> None:
        """Recorded (and committed) before every attempt, so a crash mid-send is noticed."""
        self._set(key, now_at, "status='sending', attempts=attempts+1", ())

    def mark_sending_many(self, keys: Sequence[str], now_at: datetime) -> None:
        """Mark a batch of events ``sending`` in ONE committed transaction, before any of them
        is posted (delivery.py): a crash from then on makes the next run look them up."""
        self._writable()
        if not keys:
            return
        now = epoch(now_at)
        with self._tx(f"record that {len(keys)} events are being sent") as cur:
            cur.executemany(
                "UPDATE outbox SET status='sending', attempts=attempts+1, updated_at=? "
                "WHERE event_key=?",
                [(now, key) for key in keys],
            )

    def record_outcomes(self, updates: Sequence[OutboxUpdate], now_at: datetime) -> None:
        """Record the outcomes of several sends in ONE transaction (see OutboxUpdate)."""
        self._writable()
        if not updates:
            return
        now = epoch(now_at)
        doing = (
            f"record the outcome of event {updates[0].event_key}"
            if len(updates) == 1
            else f"record the outcome of {len(updates)} events"
        )
        with self._tx(doing) as cur:
            acked = [u.event_key for u in updates if u.status == OutboxStatus.ACKED]
            dead = [u.event_key for u in updates if u.status == OutboxStatus.DEAD]
            count_acked(cur, acked, now)
            count_kind(
                cur,
                "looked_up",
                [u.event_key for u in updates if u.found_by_lookup],
                OutboxStatus.ACKED,
            )
            count_kind(cur, "dead", dead, OutboxStatus.DEAD)
            for u in updates:
                if u.status == OutboxStatus.ACKED:
                    cur.execute(
                        _ACK, (u.extra, int(u.outcome_unknown), u.event_id, now, u.event_key)
                    )
                    continue
                cur.execute(
                    """UPDATE outbox SET status=?, event_id=coalesce(?, event_id),
                         last_error=coalesce(?, last_error),
                         outcome_unknown=max(outcome_unknown, ?),
                         attempts=max(0, attempts + ?), updated_at=?
                       WHERE event_key=?""",
                    (
                        u.status,
                        u.event_id,
                        u.error,
                        int(u.outcome_unknown),
                        u.extra,
                        now,
                        u.event_key,
                    ),
                )

    def mark_acked(self, key: str, event_id: Optional[str], now_at: datetime) -> None:
        """Acknowledged: counted (totals), and its request body dropped (not needed again)."""
        self.record_outcomes([OutboxUpdate(key, OutboxStatus.ACKED, event_id=event_id)], now_at)

    def mark_dead(self, key: str, error: str, now_at: datetime) -> None:
        self._set(key, now_at, "status='dead', last_error=?", (error,))

    def mark_pending(self, key: str, error: str, outcome_unknown: bool, now_at: datetime) -> None:
        """Not delivered this time; ``outcome_unknown`` is sticky until the key is acked."""
        self._set(
            key,
            now_at,
            "status='pending', last_error=?, outcome_unknown=max(outcome_unknown, ?)",
            (error, int(outcome_unknown)),
        )

    def retry(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Named dead (or dropped) events back to pending; with ``keys`` None, every dead one
        (never the dropped ones: an operator gave those up on purpose)."""
        if keys is None:
            return self._move(None, (OutboxStatus.DEAD,), OutboxStatus.PENDING, now_at)
        return self._move(
            keys, (OutboxStatus.DEAD, OutboxStatus.DROPPED), OutboxStatus.PENDING, now_at
        )

    def drop(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Give up dead or held events (kept, marked dropped, for the record)."""
        return self._move(
            keys, (OutboxStatus.DEAD, OutboxStatus.HELD), OutboxStatus.DROPPED, now_at
        )

    def release(self, keys: Optional[Sequence[str]], now_at: datetime) -> int:
        """Held events to pending (the next sync sends them); all held ones when ``keys`` is
        None. Returns how many were released."""
        return self._move(keys, (OutboxStatus.HELD,), OutboxStatus.PENDING, now_at)

    def replan(
        self,
        key: str,
        allocation: str,
        sku: str,
        new_key: str,
        body: Mapping[str, Any],
        now_at: datetime,
    ) -> bool:
        """A dead event re-mapped to ``allocation`` and ``sku`` (``outbox replan``), in ONE
        transaction: under the same key it goes back to pending; under a new key (the SKU is
        part of the key) a new pending row replaces it and the old one is dropped. False when
        the event is no longer dead."""
        self._writable()
        now = epoch(now_at)
        with self._tx("replan an event") as cur:
            row = cur.execute(
                "SELECT quantity, started_at, ended_at FROM outbox WHERE event_key=? "
                "AND status='dead'",
                (key,),
            ).fetchone()
            if row is None:
                return False
            text = json.dumps(body, sort_keys=True)
            if new_key == key:
                cur.execute(
                    """UPDATE outbox SET allocation=?, sku=?, body=?, status='pending',
                       outcome_unknown=0, last_error='', updated_at=? WHERE event_key=?""",
                    (allocation, sku, text, now, key),
                )
                return True
            cur.execute(  # a key already stored means this stretch is planned: not twice
                """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity, started_at,
                   ended_at, body, status, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
                (new_key, allocation, sku, row[0], row[1], row[2], text, now, now),
            )
            if cur.rowcount:
                add_counts(cur, "totals", ("kind", "planned"), counted([(allocation, sku, row[0])]))
            cur.execute(
                "UPDATE outbox SET status='dropped', last_error=?, updated_at=? WHERE event_key=?",
                (f"replanned as {new_key}", now, key),
            )
            return True

    def _move(
        self, keys: Optional[Sequence[str]], from_: Sequence[str], to: str, now_at: datetime
    ) -> int:
        self._writable()
        sql = f"UPDATE outbox SET status=?, updated_at=? WHERE status IN ({marks(from_)})"
        if (
            to == OutboxStatus.PENDING
        ):  # a row acknowledged once (then deleted on the API) has no body
            sql += " AND body != ''"
        with self._tx(f"move events to {to}") as cur:
            if keys is None:
                cur.execute(sql, (to, epoch(now_at), *from_))
                return cur.rowcount
            count = 0
            for key in keys:
                cur.execute(sql + " AND event_key=?", (to, epoch(now_at), *from_, key))
                count += cur.rowcount
            return count

    def known_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` this file's outbox holds (in any status)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        for chunk in chunks(wanted):
            found.update(
                key
                for (key,) in self._query(
                    f"SELECT event_key FROM outbox WHERE event_key IN ({marks(chunk)})", chunk
                )
            )
        return found

    def mark_deleted(self, keys: Iterable[str], reason: str, now_at: datetime) -> int:
        """Outbox rows of events deleted on the API (``slurm-tracker reconcile --repair``) become
        ``dropped`` with ``reason`` as their last error: kept for the record, never sent again by
        a sync, and not revived by ``outbox retry --all``. Returns how many rows changed."""
        self._writable()
        count = 0
        with self._tx("record deleted events") as cur:
            for key in dict.fromkeys(keys):
                cur.execute(
                    "UPDATE outbox SET status='dropped', last_error=?, updated_at=? "
                    "WHERE event_key=? AND status != 'dropped'",
                    (reason, epoch(now_at), key),
                )
                count += cur.rowcount
        return count

    def outbox_statuses(self) -> dict[str, str]:
        """Every event key of the outbox with its status (no bodies read)."""
        return dict(self._query("SELECT event_key, status FROM outbox"))
