"""The state file's marks and housekeeping: the high-water mark (and its repair by hand), the
billing floor, a backfill's resume point, the last comparison with the API's record; pruning
(progress no window can return, acknowledged events no longer needed, old records) and
giving free pages back."""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime, timedelta, timezone
from typing import Optional

from slurm_tracker.errors import StateError
from slurm_tracker.state_base import StateBase
from slurm_tracker.state_rows import epoch, from_epoch, iso
from slurm_tracker.state_schema import (
    HOURS_KEPT,
    RECORD_RETENTION_S,
    SAVED_FILE_SLACK_S,
    VACUUM_FREE_SHARE,
)

log = logging.getLogger("slurm_tracker.state")


class MarksMixin(StateBase):
    """Marks, pruning and size (a mixin of :class:`state.State`)."""

    def high_water_at(self) -> Optional[datetime]:
        return self._meta_time("high_water_at")

    def pruned_before(self) -> Optional[datetime]:
        """Runs that ended before this instant may have lost their progress rows."""
        return self._meta_time("pruned_before")

    def set_high_water(
        self, at: datetime, now_at: datetime, *, overlap_s: int = 0
    ) -> Optional[datetime]:
        """Repair the high-water mark (it may move back); returns the mark it replaces.

        Refused (StateError) after ``now_at`` or the real clock, and when the next window
        (from ``at`` minus ``overlap_s``, the sacct overlap) would start before
        ``pruned_before()``: runs that ended then are forgotten and would be billed twice.
        """
        self._writable()
        clock = min(now_at, datetime.now(timezone.utc))
        if at > clock:
            raise StateError(
                f"cannot set the high-water mark to {iso(at)}: it is after now ({iso(clock)}); "
                "the mark may never be ahead of the clock"
            )
        with self._tx("set the high-water mark") as cur:
            got: dict[str, str] = dict(
                cur.execute(
                    "SELECT key, value FROM meta WHERE key IN ('high_water_at', 'pruned_before')"
                ).fetchall()
            )
            pruned = from_epoch(int(got["pruned_before"])) if "pruned_before" in got else None
            if pruned is not None and at - timedelta(seconds=overlap_s) < pruned:
                raise StateError(
                    f"cannot set the high-water mark to {iso(at)}: the state file no longer "
                    f"remembers runs that ended before {iso(pruned)} (pruned), and a window "
                    f"starting before then would bill them a second time; choose "
                    f"{iso(pruned + timedelta(seconds=overlap_s))} or later"
                )
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('high_water_at', ?)",
                (str(epoch(at)),),
            )
        old = from_epoch(int(got["high_water_at"])) if "high_water_at" in got else None
        log.warning(
            "high-water mark set by hand to %s (it was %s)",
            iso(at),
            iso(old) if old else "unset",
        )
        return old

    # ------------------------------------------------------------------ the API's record
    def floor_at(self) -> Optional[datetime]:
        """The billing floor: the start of the first sync's window (never billed before)."""
        return self._meta_time("floor_at")

    def set_floor(self, at: datetime) -> None:
        """Store the billing floor, once (a floor already stored is kept)."""
        self._writable()
        with self._tx("store the billing floor") as cur:
            cur.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('floor_at', ?)",
                (str(epoch(at)),),
            )

    # ------------------------------------------------------------------ backfill resume
    def backfill_done_through(self, start_at: datetime, chunk_s: int) -> Optional[datetime]:
        """How far a backfill from ``start_at`` in chunks of ``chunk_s`` got (its chunks up to
        there are committed), when that is the backfill last left unfinished; else None."""
        value = self._meta("backfill")
        try:
            done = json.loads(value) if value else {}
            if done.get("start") == epoch(start_at) and done.get("chunk") == chunk_s:
                return from_epoch(int(done["doneThrough"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("the backfill progress in %s is unreadable: starting over", self.path)
        return None

    def set_backfill_done(
        self, start_at: datetime, chunk_s: int, through: Optional[datetime]
    ) -> None:
        """Remember that a backfill's chunks up to ``through`` are committed (None: it
        finished, nothing to resume)."""
        self._writable()
        with self._tx("record the backfill's progress") as cur:
            if through is None:
                cur.execute("DELETE FROM meta WHERE key = 'backfill'")
                return
            done = {"start": epoch(start_at), "chunk": chunk_s, "doneThrough": epoch(through)}
            cur.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('backfill', ?)",
                (json.dumps(done),),
            )

    def ledger_checked_at(self) -> Optional[datetime]:
        """Until when the API's events of this cluster were compared with this file."""
        return self._meta_time("ledger_checked_at")

    # ------------------------------------------------------------------ housekeeping
    def prune(self, now_at: datetime, overlap_s: int, retention_s: int) -> tuple[int, int]:
        """Forget final runs that no future window can return, acknowledged events no longer
        needed, old dropped events and resolved quarantine entries; give free space back.

        A final run is kept while it could still appear in a window: it ended after the
        high-water mark minus the overlap, with a day to spare. Without a mark (only saved
        sacct files were read: they have no window) the newest billed end of a final run
        stands in for the mark (never later than ``now_at``), with SAVED_FILE_SLACK_S more to
        spare: a file fed that much later than the newest one brings runs that are skipped as
        forgotten, as a window over pruned history does. Runs are first seen while they run or
        right after they end, so a run a later file brings for the first time is newer than
        the horizon unless the files are fed out of order by more than the slack.

        An acknowledged event is kept ``retention_s`` after its acknowledgement, counted from
        the last comparison with the API's record when that is older (it reads the keys of the
        events created since: ledger.check). It was counted when acknowledged (``totals``,
        ``acked_hours``), so deleting it lowers no total. Dropped events and resolved
        quarantine entries are kept RECORD_RETENTION_S (or ``retention_s`` if longer).
        Returns (progress rows, outbox rows) deleted.
        """
        self._writable()
        now = epoch(now_at)
        checked = self._meta("ledger_checked_at")
        acked_before = min(now, int(checked) if checked else now) - retention_s
        record_before = now - max(retention_s, RECORD_RETENTION_S)
        removed_runs = 0
        with self._tx("prune it") as cur:
            horizon = self._progress_horizon(cur, now, overlap_s)
            if horizon is not None:
                cur.execute("DELETE FROM progress WHERE final=1 AND last_end_at < ?", (horizon,))
                removed_runs = cur.rowcount
                if removed_runs:
                    cur.execute(
                        """INSERT INTO meta (key, value) VALUES ('pruned_before', ?)
                           ON CONFLICT (key) DO UPDATE SET value = CAST(max(
                             CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)""",
                        (str(horizon),),
                    )
            cur.execute(
                "DELETE FROM outbox WHERE status='acked' AND updated_at < ?", (acked_before,)
            )
            removed_events = cur.rowcount
            cur.execute(
                "DELETE FROM outbox WHERE status='dropped' AND updated_at < ?", (record_before,)
            )
            removed_events += cur.rowcount
            cur.execute(
                "DELETE FROM quarantine WHERE resolved_at IS NOT NULL AND resolved_at < ?",
                (record_before,),
            )
            cur.execute("DELETE FROM acked_hours WHERE hour < ?", (now // 3600 - HOURS_KEPT,))
        self._give_back_free_pages()
        return removed_runs, removed_events

    @staticmethod
    def _progress_horizon(cur: sqlite3.Cursor, now: int, overlap_s: int) -> Optional[int]:
        """Final runs that ended (start + billed seconds) before this epoch are forgotten."""
        row = cur.execute("SELECT value FROM meta WHERE key='high_water_at'").fetchone()
        if row is not None:
            return int(row[0]) - overlap_s - 86400
        newest = cur.execute("SELECT max(last_end_at) FROM progress WHERE final=1").fetchone()
        if newest is None or newest[0] is None:
            return None
        return min(int(newest[0]), now) - overlap_s - 86400 - SAVED_FILE_SLACK_S

    def _give_back_free_pages(self) -> None:
        """With auto_vacuum=INCREMENTAL, free pages beyond a quarter of the file go back to the
        file system (below that they are kept for the next syncs' rows: no churn)."""
        with self._guard("compact it"), self._lock:
            (mode,) = self._conn.execute("PRAGMA auto_vacuum").fetchone()
            (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
            (pages,) = self._conn.execute("PRAGMA page_count").fetchone()
            if mode == 2 and free * VACUUM_FREE_SHARE > pages:
                # executescript steps the pragma to its end (execute frees only one page)
                self._conn.executescript(f"PRAGMA incremental_vacuum({int(free)});")

    def size(self) -> dict[str, int]:
        """The file's size in bytes (``file``: pages in use and free, ``free``: free pages)."""
        with self._guard("read it"), self._lock:
            (page,) = self._conn.execute("PRAGMA page_size").fetchone()
            (pages,) = self._conn.execute("PRAGMA page_count").fetchone()
            (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
        return {"file": int(page * pages), "free": int(page * free)}
