"""Corrections in the state file: final runs whose ElapsedRaw fell below what was billed,
recorded by a plan (:func:`note_corrections`, inside ``commit_plan``'s transaction), listed,
applied (the only place a run's progress goes down) or dismissed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Optional

from slurm_tracker.state_base import StateBase
from slurm_tracker.state_rows import CorrectionRow, CorrectionSeen, correction_row, epoch
from slurm_tracker.state_schema import CORRECTION_COLUMNS, QUARANTINE_TEXT_MAX


def note_corrections(
    cur: sqlite3.Cursor,
    corrections: Sequence[CorrectionSeen],
    final_seen: Mapping[str, int],
    now: int,
) -> None:
    """Inside commit_plan's transaction: record each correction found, or see it again.

    A new one is open. An open one takes the latest numbers. An applied one opens again
    (slurmdbd now says even less than it was corrected to); a dismissed one stays dismissed
    unless slurmdbd's seconds changed. ``final_seen`` (run -> ElapsedRaw of runs whose
    final record shows no over-billing): an open correction of such a run is out of date;
    it is dismissed, unless an apply already deleted events of the run (``removed``): then
    it takes the new seconds, and the next apply posts the deleted stretches up to them.
    """
    for seen in corrections:
        row = cur.execute(
            "SELECT status, actual_s FROM corrections WHERE run=?", (seen.run,)
        ).fetchone()
        values = (
            seen.job_id,
            json.dumps(list(seen.allocations)),
            json.dumps(list(seen.skus)),
            seen.billed_s,
            seen.actual_s,
            seen.record,
        )
        if row is None:
            cur.execute(
                f"""INSERT INTO corrections ({CORRECTION_COLUMNS})
                    VALUES (?, ?, ?, ?, ?, ?, ?, 'open', '[]', 0, '', ?, ?, 1, ?, NULL)""",
                (seen.run, *values, now, now, now),
            )
            continue
        status, actual_s = row
        reopen = status == "applied" or (status == "dismissed" and actual_s != seen.actual_s)
        cur.execute(
            """UPDATE corrections SET job_id=?, allocations=?, skus=?, billed_s=?, actual_s=?,
               record=?, last_seen_at=?, times_seen=times_seen+1, updated_at=?"""
            + (
                ", status='open', removed='[]', attempts=0, note='', resolved_at=NULL"
                if reopen
                else ""
            )
            + " WHERE run=?",
            (*values, now, now, seen.run),
        )
    if not final_seen:
        return
    open_runs = [r for (r,) in cur.execute("SELECT run FROM corrections WHERE status='open'")]
    for run in open_runs:
        if run not in final_seen:
            continue
        elapsed = final_seen[run]
        cur.execute(
            """UPDATE corrections SET actual_s=?, last_seen_at=?, updated_at=?,
               status = CASE WHEN removed='[]' THEN 'dismissed' ELSE status END,
               resolved_at = CASE WHEN removed='[]' THEN ? ELSE resolved_at END,
               note = CASE WHEN removed='[]' THEN ? ELSE note END
               WHERE run=? AND status='open'""",
            (
                elapsed,
                now,
                now,
                now,
                f"slurmdbd now says {elapsed} s, no less than what was billed: nothing to correct",
                run,
            ),
        )


class CorrectionsMixin(StateBase):
    """Corrections (a mixin of :class:`state.State`)."""

    def corrections(self, include_closed: bool = False) -> list[CorrectionRow]:
        """Corrections, oldest first; only the open ones unless ``include_closed``."""
        if self._schema < 3:  # a file of an older schema opened read-only: it has none
            return []
        sql = f"SELECT {CORRECTION_COLUMNS} FROM corrections"
        if not include_closed:
            sql += " WHERE status='open'"
        return [correction_row(r) for r in self._query(sql + " ORDER BY first_seen_at, run")]

    def correction(self, run: str) -> Optional[CorrectionRow]:
        if self._schema < 3:
            return None
        rows = self._query(f"SELECT {CORRECTION_COLUMNS} FROM corrections WHERE run=?", (run,))
        return correction_row(rows[0]) if rows else None

    def correction_count(self) -> int:
        """How many corrections are open."""
        if self._schema < 3:
            return 0
        return int(self._query("SELECT count(*) FROM corrections WHERE status='open'")[0][0])

    def correction_removing(self, run: str, removed: str, now_at: datetime) -> None:
        """Before events of ``run`` are deleted on the API: what they bill (``removed``, JSON
        stretches, with those of earlier attempts), so that an attempt that stops after the
        deletion leaves the next one knowing what to post again."""
        self._writable()
        with self._tx(f"record the correction of run {run}") as cur:
            cur.execute(
                "UPDATE corrections SET removed=?, updated_at=? WHERE run=? AND status='open'",
                (removed, epoch(now_at), run),
            )

    def correction_failed(self, run: str, note: str, now_at: datetime) -> None:
        """An attempt to apply the correction of ``run`` stopped (it stays open): why."""
        self._writable()
        with self._tx(f"record the correction of run {run}") as cur:
            cur.execute(
                "UPDATE corrections SET note=?, attempts=attempts+1, updated_at=? "
                "WHERE run=? AND status='open'",
                (note[:QUARANTINE_TEXT_MAX], epoch(now_at), run),
            )

    def correction_applied(self, run: str, now_at: datetime) -> bool:
        """The API's record of ``run`` is corrected: in ONE transaction, the run's progress is
        set down to slurmdbd's seconds (the only place progress goes down) and the correction
        is marked applied. False when it was not open."""
        self._writable()
        now = epoch(now_at)
        with self._tx(f"record the correction of run {run}") as cur:
            row = cur.execute(
                "SELECT actual_s FROM corrections WHERE run=? AND status='open'", (run,)
            ).fetchone()
            if row is None:
                return False
            cur.execute(
                "UPDATE progress SET reported_s=min(reported_s, ?), updated_at=? WHERE run=?",
                (row[0], now, run),
            )
            cur.execute(
                "UPDATE corrections SET status='applied', note='', attempts=attempts+1, "
                "resolved_at=?, updated_at=? WHERE run=?",
                (now, now, run),
            )
        return True

    def dismiss_corrections(self, runs: Sequence[str], note: str, now_at: datetime) -> int:
        """Open corrections of ``runs`` to dismissed (the over-billing stays on the API, on
        purpose). One whose apply already deleted events is not dismissed: the next apply must
        post their valid part again. Returns how many were dismissed."""
        self._writable()
        now = epoch(now_at)
        count = 0
        with self._tx("dismiss corrections") as cur:
            for run in dict.fromkeys(runs):
                cur.execute(
                    "UPDATE corrections SET status='dismissed', note=?, resolved_at=?, "
                    "updated_at=? WHERE run=? AND status='open' AND removed='[]'",
                    (note[:QUARANTINE_TEXT_MAX], now, now, run),
                )
                count += cur.rowcount
        return count
