"""Carrying the older Go agent's progress into a new state file (``slurm-tracker migrate
state``, issue 13) and what the file notes of it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Optional

from slurm_tracker.errors import StateError
from slurm_tracker.state_base import StateBase
from slurm_tracker.state_plan import not_after_clock
from slurm_tracker.state_rows import epoch


class MigrationMixin(StateBase):
    """The migration from the Go agent (a mixin of :class:`state.State`)."""

    def import_progress(
        self,
        runs: Sequence[tuple[str, int, int, bool]],
        floor_at: datetime,
        note: Mapping[str, Any],
        now_at: datetime,
    ) -> int:
        """What the older Go agent billed (``slurm-tracker migrate state``), in ONE transaction:
        per run (identity text, elapsed seconds billed, wall-clock end of the billed part as
        epoch seconds, final), its progress; the billing floor and the high-water mark at
        ``floor_at``; ``note`` (JSON) kept as meta ``migrated_from``.

        Only into a state file that never billed: one with a floor, a high-water mark, progress
        or outbox rows is refused (StateError), nothing written. Returns the runs recorded."""
        self._writable()
        now = epoch(now_at)
        with self._tx("record the migrated progress") as cur:
            used = [
                what
                for what, sql in (
                    ("a billing floor", "SELECT 1 FROM meta WHERE key='floor_at'"),
                    ("a high-water mark", "SELECT 1 FROM meta WHERE key='high_water_at'"),
                    ("a migration", "SELECT 1 FROM meta WHERE key='migrated_from'"),
                    ("progress rows", "SELECT 1 FROM progress LIMIT 1"),
                    ("outbox rows", "SELECT 1 FROM outbox LIMIT 1"),
                )
                if cur.execute(sql).fetchone() is not None
            ]
            if used:
                raise StateError(
                    f"state file {self.path} has already been used ({', '.join(used)}): the "
                    "old agent's progress can only be carried into a state file before its "
                    "first sync; nothing was written. Migrate into a new state file (--state)"
                )
            for run, seconds, end, final in runs:
                cur.execute(
                    """INSERT INTO progress (run, reported_s, last_end_at, final, updated_at)
                       VALUES (?, ?, ?, ?, ?)""",
                    (run, seconds, end, int(final), now),
                )
            for key, value in (
                ("floor_at", str(epoch(floor_at))),
                ("high_water_at", str(epoch(not_after_clock(floor_at)))),
                ("migrated_from", json.dumps(note, sort_keys=True)),
            ):
                cur.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return len(runs)

    def migration(self) -> Optional[dict[str, Any]]:
        """What ``import_progress`` noted (None when this file was not migrated)."""
        text = self._meta("migrated_from")
        if not text:
            return None
        try:
            note = json.loads(text)
        except ValueError:
            return {}
        return note if isinstance(note, dict) else {}
