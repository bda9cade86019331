"""Planning into the state file: the runs' progress (what is billed, which keeps billing
exactly once) and the ONE transaction that stores a plan (outbox rows, progress, quarantined
records, corrections, the high-water mark), or takes the API's events as billed (``adopt``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Optional

from slurm_tracker.models import PlannedEvent, RunKey
from slurm_tracker.state_base import StateBase
from slurm_tracker.state_corrections import note_corrections
from slurm_tracker.state_rows import (
    AdoptedEvent,
    CorrectionSeen,
    Progress,
    QuarantineEntry,
    epoch,
    from_epoch,
    iso,
)
from slurm_tracker.state_schema import QUARANTINE_COLUMNS, QUARANTINE_TEXT_MAX
from slurm_tracker.state_totals import add_counts, chunks, counted, marks
from slurm_tracker.statuses import OutboxStatus

log = logging.getLogger("slurm_tracker.state")


class PlanMixin(StateBase):
    """Progress and plans (a mixin of :class:`state.State`)."""

    def reported(self, runs: Iterable[RunKey]) -> dict[RunKey, int]:
        """Elapsed seconds already billed, for those of ``runs`` that have been billed."""
        wanted = {run.text: run for run in runs}
        texts = list(wanted)
        result: dict[RunKey, int] = {}
        for chunk in chunks(texts):
            for text, seconds in self._query(
                f"SELECT run, reported_s FROM progress WHERE run IN ({marks(chunk)})", chunk
            ):
                result[wanted[text]] = seconds
        return result

    def progress(self, run: RunKey) -> Optional[Progress]:
        rows = self._query(
            "SELECT reported_s, last_end_at, final FROM progress WHERE run=?", (run.text,)
        )
        if not rows:
            return None
        seconds, end, final = rows[0]
        end_at = from_epoch(end)
        assert end_at is not None
        return Progress(seconds, end_at, bool(final))

    # ------------------------------------------------------------------ planning
    def commit_plan(
        self,
        events: Sequence[PlannedEvent],
        bodies: Sequence[Mapping[str, Any]],
        now_at: datetime,
        high_water_at: Optional[datetime] = None,
        *,
        held: Collection[str] = (),
        quarantine: Sequence[QuarantineEntry] = (),
        resolved: Collection[str] = (),
        corrections: Sequence[CorrectionSeen] = (),
        final_seen: Optional[Mapping[str, int]] = None,
    ) -> int:
        """Store a plan in ONE transaction: new outbox rows, the runs' progress, quarantined
        records, corrections (see ``_note_corrections``) and the high-water mark.

        Events whose key is in ``held`` are stored ``held`` (sent once released). Each
        ``quarantine`` entry is recorded or seen again (re-opened if it was resolved); open
        entries whose key is in ``resolved`` are closed (an entry in both stays open). The mark
        never moves back, nor past the real clock. Returns how many events were new (an event
        key already stored is left as it is).
        """
        self._writable()
        if len(events) != len(bodies):
            raise ValueError(f"{len(events)} events but {len(bodies)} bodies")
        now = epoch(now_at)
        held_keys = frozenset(held)
        progress: dict[str, tuple[int, int, bool]] = {}
        for event in events:
            seen = progress.get(event.run.text, (0, 0, False))
            progress[event.run.text] = (
                max(seen[0], event.to_s),
                max(seen[1], epoch(event.ended_at)),
                seen[2] or event.final,
            )
        entries = {e.key: e for e in quarantine}  # one sighting per key and plan
        mark = None if high_water_at is None else not_after_clock(high_water_at)
        added = 0
        planned: list[tuple[str, str, str]] = []
        with self._tx("store the plan") as cur:
            for event, body in zip(events, bodies):
                cur.execute(
                    """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity,
                       started_at, ended_at, body, status, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        event.event_key,
                        event.allocation,
                        event.sku,
                        str(event.quantity),
                        epoch(event.started_at),
                        epoch(event.ended_at),
                        json.dumps(body, sort_keys=True),
                        OutboxStatus.HELD if event.event_key in held_keys else OutboxStatus.PENDING,
                        now,
                        now,
                    ),
                )
                if cur.rowcount:
                    added += 1
                    planned.append((event.allocation, event.sku, str(event.quantity)))
            add_counts(cur, "totals", ("kind", "planned"), counted(planned))
            for run, (seconds, end, final) in progress.items():
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (run) DO UPDATE SET
                         reported_s = max(reported_s, excluded.reported_s),
                         last_end_at = max(last_end_at, excluded.last_end_at),
                         final = max(final, excluded.final),
                         updated_at = excluded.updated_at""",
                    (run, seconds, end, int(final), now),
                )
            for key in resolved:
                cur.execute(
                    "UPDATE quarantine SET resolved_at=? WHERE key=? AND resolved_at IS NULL",
                    (now, key),
                )
            for entry in entries.values():
                if entry.remember_run:
                    cur.execute(
                        """INSERT OR IGNORE INTO progress
                           (run, reported_s, last_end_at, final, updated_at)
                           VALUES (?, 0, 0, 0, ?)""",
                        (entry.remember_run, now),
                    )
                cur.execute(
                    f"""INSERT INTO quarantine ({QUARANTINE_COLUMNS})
                       VALUES (?, ?, ?, ?, ?, ?, 1, NULL)
                       ON CONFLICT (key) DO UPDATE SET
                         job_id = excluded.job_id,
                         reason = excluded.reason,
                         text = excluded.text,
                         last_seen_at = excluded.last_seen_at,
                         times_seen = times_seen + 1,
                         resolved_at = NULL""",
                    (
                        entry.key,
                        entry.job_id,
                        entry.reason[:QUARANTINE_TEXT_MAX],
                        entry.text[:QUARANTINE_TEXT_MAX],
                        now,
                        now,
                    ),
                )
            note_corrections(cur, corrections, final_seen or {}, now)
            if mark is not None:
                cur.execute(
                    """INSERT INTO meta (key, value) VALUES ('high_water_at', ?)
                       ON CONFLICT (key) DO UPDATE SET value =
                         CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
                              AS TEXT)""",
                    (str(epoch(mark)),),
                )
        return added

    def adopt(self, events: Sequence[AdoptedEvent], now_at: datetime, checked_at: datetime) -> int:
        """Take events the API holds but this file does not know (a lost, restored or replaced
        state file, or an agent taken over) as billed, in ONE transaction: each becomes an
        acknowledged outbox row and its run's progress covers it. Records that the API was
        compared up to ``checked_at``. Returns how many events were new to this file."""
        self._writable()
        now = epoch(now_at)
        added = 0
        adopted: list[tuple[str, str, str]] = []
        with self._tx("adopt the API's events") as cur:
            for event in events:
                cur.execute(
                    """INSERT OR IGNORE INTO outbox (event_key, allocation, sku, quantity,
                       started_at, ended_at, body, status, event_id, last_error, created_at,
                       updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, '', 'acked', ?, ?, ?, ?)""",
                    (
                        event.key,
                        event.allocation,
                        event.sku,
                        str(event.quantity),
                        epoch(event.started_at),
                        epoch(event.ended_at),
                        event.event_id,
                        "adopted: found on the API, posted by an earlier state or agent",
                        now,
                        now,
                    ),
                )
                if cur.rowcount:
                    added += 1
                    adopted.append((event.allocation, event.sku, str(event.quantity)))
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, 0, ?)
                       ON CONFLICT (run) DO UPDATE SET
                         reported_s = max(reported_s, excluded.reported_s),
                         last_end_at = max(last_end_at, excluded.last_end_at),
                         updated_at = excluded.updated_at""",
                    (event.run, event.to_s, epoch(event.ended_at), now),
                )
            cur.execute(
                """INSERT INTO meta (key, value) VALUES ('ledger_checked_at', ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (str(epoch(checked_at)),),
            )
            counts = counted(adopted)  # adopted rows count as planned and acknowledged
            add_counts(cur, "totals", ("kind", "planned"), counts)
            add_counts(cur, "totals", ("kind", "posted"), counts)
            add_counts(cur, "acked_hours", ("hour", now // 3600), counts)
        return added


def not_after_clock(at: datetime) -> datetime:
    """``at``, or the real clock when ``at`` is later (a typo, or a pinned ``--now``)."""
    clock = datetime.now(timezone.utc)
    if at > clock:
        log.warning(
            "the high-water mark may not move past the real clock: %s kept at %s",
            iso(at),
            iso(clock),
        )
        return clock
    return at
