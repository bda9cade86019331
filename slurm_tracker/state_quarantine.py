"""The quarantine in the state file: records that could not be billed, kept (and counted)
until resolved (stored by ``commit_plan``, see state_plan)."""

from __future__ import annotations

from slurm_tracker.state_base import StateBase
from slurm_tracker.state_rows import QuarantineRow, from_epoch
from slurm_tracker.state_schema import QUARANTINE_COLUMNS


class QuarantineMixin(StateBase):
    """The quarantine (a mixin of :class:`state.State`)."""

    def quarantine_rows(self, include_resolved: bool = False) -> list[QuarantineRow]:
        """Quarantined records, oldest first; only the open ones unless ``include_resolved``."""
        if self._schema < 2:  # a file of schema 1 opened read-only: it has none
            return []
        sql = f"SELECT {QUARANTINE_COLUMNS} FROM quarantine"
        if not include_resolved:
            sql += " WHERE resolved_at IS NULL"
        rows = []
        for key, job_id, reason, text, first, last, times, resolved in self._query(
            sql + " ORDER BY first_seen_at, key"
        ):
            first_at, last_at = from_epoch(first), from_epoch(last)
            assert first_at is not None and last_at is not None
            rows.append(
                QuarantineRow(
                    key, job_id, reason, text, first_at, last_at, times, from_epoch(resolved)
                )
            )
        return rows

    def quarantine_count(self) -> int:
        """How many quarantined records are open."""
        if self._schema < 2:
            return 0
        return int(self._query("SELECT count(*) FROM quarantine WHERE resolved_at IS NULL")[0][0])
