"""What the state file counts as it goes: cumulative (events, quantity) per allocation and
SKU planned, posted (acknowledged), found by a look-up or dead-lettered (table ``totals``, the
metrics' counters, never lowered by pruning), and acknowledged per hour (``acked_hours``, for
``status``). Counted inside the transaction that stores or acknowledges the rows; carried
once from the folds a version-3 file kept in meta (the migration to version 4)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence, Sized
from decimal import Decimal
from typing import Any, TypeVar

from slurm_tracker.state_schema import HOURS_KEPT

_T = TypeVar("_T")

IN_CHUNK = 500  # keys per ``IN (...)`` list (SQLite allows 999 parameters before 3.32)

POSTED_TOTALS = "posted_totals"  # meta (version 3): cumulative acknowledged events, folded
PLANNED_TOTALS = "planned_totals"  # meta (version 3): cumulative events planned, folded


def _fold(
    cur: sqlite3.Cursor, name: str, column: str, condition: str
) -> dict[tuple[str, str], tuple[int, Decimal]]:
    """Add the outbox rows (matching ``condition``) whose ``column`` time is at or after the
    last fold's to the cumulative totals stored under ``name`` in meta (how version 3 kept
    them; used once, by the migration to version 4)."""
    row = cur.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
    data = json.loads(row[0]) if row else {}
    totals = {(a, s): (int(n), Decimal(q)) for a, s, n, q in data.get("totals", [])}
    through = int(data.get("through", -1))
    at_through = set(data.get("atThrough", []))
    for key, allocation, sku, quantity, at in cur.execute(
        f"SELECT event_key, allocation, sku, quantity, {column} FROM outbox "
        f"WHERE {condition}{column} >= ? ORDER BY {column}",
        (through,),
    ).fetchall():
        if at == through and key in at_through:
            continue
        if at > through:
            through, at_through = at, set()
        at_through.add(key)
        n, q = totals.get((allocation, sku), (0, Decimal(0)))
        totals[(allocation, sku)] = (n + 1, q + Decimal(quantity))
    data = {
        "totals": [[a, s, n, str(q)] for (a, s), (n, q) in sorted(totals.items())],
        "through": through,
        "atThrough": sorted(at_through),
    }
    cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (name, json.dumps(data)))
    return totals


Counts = dict[tuple[str, str], tuple[int, Decimal]]


def counted(rows: Iterable[tuple[str, str, str]]) -> Counts:
    """(events, quantity) per (allocation, SKU) of rows (allocation, SKU, decimal text)."""
    counts: Counts = {}
    for allocation, sku, quantity in rows:
        n, q = counts.get((allocation, sku), (0, Decimal(0)))
        counts[(allocation, sku)] = (n + 1, q + Decimal(quantity))
    return counts


def add_counts(cur: sqlite3.Cursor, table: str, first: tuple[str, Any], counts: Counts) -> None:
    """Add ``counts`` to the rows of ``table`` (totals or acked_hours) whose first key column
    (``first``: name, value) has that value."""
    column, value = first
    for (allocation, sku), (added, quantity) in sorted(counts.items()):
        row = cur.execute(
            f"SELECT events, quantity FROM {table} WHERE {column}=? AND allocation=? AND sku=?",
            (value, allocation, sku),
        ).fetchone()
        n, q = (0, Decimal(0)) if row is None else (int(row[0]), Decimal(row[1]))
        cur.execute(
            f"INSERT OR REPLACE INTO {table} ({column}, allocation, sku, events, quantity) "
            "VALUES (?, ?, ?, ?, ?)",
            (value, allocation, sku, n + added, str(q + quantity)),
        )


def chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``items`` in slices of IN_CHUNK (one ``IN (...)`` query each)."""
    for i in range(0, len(items), IN_CHUNK):
        yield items[i : i + IN_CHUNK]


def marks(items: Sized) -> str:
    """The ``?, ?, ...`` placeholders of an ``IN (...)`` list of ``items``."""
    return ",".join("?" for _ in range(len(items)))


def _not_yet(cur: sqlite3.Cursor, keys: Collection[str], status: str) -> list[Any]:
    """(allocation, SKU, quantity) of the outbox rows of ``keys`` not in ``status``."""
    rows: list[Any] = []
    for chunk in chunks(list(keys)):
        rows += cur.execute(
            f"SELECT allocation, sku, quantity FROM outbox WHERE event_key IN ({marks(chunk)}) "
            "AND status != ?",
            [*chunk, status],
        ).fetchall()
    return rows


def count_kind(cur: sqlite3.Cursor, kind: str, keys: Collection[str], status: str) -> None:
    """Count the rows of ``keys`` not in ``status`` yet (about to be) under ``kind``."""
    rows = _not_yet(cur, keys, status)
    if rows:
        add_counts(cur, "totals", ("kind", kind), counted(rows))


def count_acked(cur: sqlite3.Cursor, keys: Collection[str], now: int) -> None:
    """Count the rows of ``keys`` not acknowledged yet (about to be) as posted, now."""
    rows = _not_yet(cur, keys, "acked")
    if rows:
        counts = counted(rows)
        add_counts(cur, "totals", ("kind", "posted"), counts)
        add_counts(cur, "acked_hours", ("hour", now // 3600), counts)


def carry_counts(cur: sqlite3.Cursor, now: int) -> None:
    """Migration to version 4: the cumulative totals that version 3 folded into meta (folded
    once more, so that rows since the last fold count) move to ``totals``; the acknowledged
    rows of the last HOURS_KEPT hours fill ``acked_hours``."""
    for name, kind, column, condition in (
        (PLANNED_TOTALS, "planned", "created_at", ""),
        (POSTED_TOTALS, "posted", "updated_at", "status='acked' AND "),
    ):
        add_counts(cur, "totals", ("kind", kind), _fold(cur, name, column, condition))
        cur.execute("DELETE FROM meta WHERE key=?", (name,))
    hours: dict[int, list[tuple[str, str, str]]] = {}
    for at, allocation, sku, quantity in cur.execute(
        "SELECT updated_at, allocation, sku, quantity FROM outbox "
        "WHERE status='acked' AND updated_at >= ?",
        (now - HOURS_KEPT * 3600,),
    ).fetchall():
        hours.setdefault(at // 3600, []).append((allocation, sku, quantity))
    for hour, rows in hours.items():
        add_counts(cur, "acked_hours", ("hour", hour), counted(rows))
