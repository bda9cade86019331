"""The older Go agent's state file (parallelworks/slurm-tracker), read for ``migrate state``.

Its one table, ``job_states(job_id INTEGER PRIMARY KEY, last_reported_elapsed INTEGER,
last_reported_at INTEGER, total_core_hours REAL, completed_at INTEGER)``: per numeric job id
(the JobIDRaw), the elapsed seconds it billed as core-hours and until when
(``last_reported_at`` = Start + those seconds while the job runs, End once it ended;
``completed_at`` 0 or NULL while it runs). The file is only ever read, and refused whole
(StateError, exit 3) when it is damaged, foreign, or holds rows that cannot be the old agent's.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from slurm_tracker.errors import StateError

_COLUMNS = (
    "job_id",
    "last_reported_elapsed",
    "last_reported_at",
    "total_core_hours",
    "completed_at",
)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MAX_PROBLEMS = 20
_EPOCH_2000 = 946684800


@dataclass(frozen=True)
class OldJob:
    """One row of the Go agent's ``job_states``."""

    job_id: int
    reported_s: int
    reported_at: datetime
    core_hours: float
    completed_at: Optional[datetime]  # None while the old agent saw it running

    @property
    def running(self) -> bool:
        return self.completed_at is None


def _time(value: int) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc)


def _corrupt(path: Path, why: str) -> StateError:
    return StateError(
        f"old agent state {path} cannot be read: {why}. Nothing was written. Give the Go "
        "agent's state file (its --state-file, a SQLite file with the table job_states), "
        "stopped (stop its timer first); restore it from a backup if it is damaged"
    )


def read_old_state(path: Path, now_at: datetime) -> list[OldJob]:
    """Every row of the Go agent's state file, checked; StateError (exit 3) lists what is wrong.

    Opened read-only (the file is never changed); a damaged or foreign file, missing columns or
    rows that cannot be the old agent's (negative seconds, times before 2000 or in the future)
    are refused."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _corrupt(path, exc.strerror or str(exc)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise _corrupt(path, "it is not a regular file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise _corrupt(path, exc.strerror or str(exc)) from exc
    if magic != _SQLITE_MAGIC:
        raise _corrupt(path, "it is not a SQLite database" + (" (empty)" if not magic else ""))
    wal = os.path.lexists(f"{path}-wal")
    uri = f"file:{quote(str(path))}?mode=ro" + ("" if wal else "&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise _corrupt(path, str(exc)) from exc
    try:
        check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise _corrupt(path, "SQLite finds it damaged: " + "; ".join(check[:5]))
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(job_states)")}
        if not columns:
            raise _corrupt(path, "it has no table job_states (not the Go agent's state)")
        missing = [c for c in _COLUMNS if c not in columns]
        if missing:
            raise _corrupt(path, f"table job_states lacks the column(s) {', '.join(missing)}")
        rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM job_states ORDER BY job_id")
        return _checked_rows(path, rows, now_at)
    except sqlite3.Error as exc:
        raise _corrupt(path, str(exc)) from exc
    finally:
        conn.close()


def _checked_rows(path: Path, rows: Iterable[Sequence[Any]], now_at: datetime) -> list[OldJob]:
    jobs: list[OldJob] = []
    problems: list[str] = []
    latest = int(now_at.timestamp()) + 300
    for job_id, elapsed, at, hours, completed in rows:
        where = f"job_states row job_id={job_id!r}"
        why = []
        if not _is_int(job_id) or job_id <= 0:
            why.append("job_id is not a positive integer")
        if not _is_int(elapsed) or elapsed < 0:
            why.append(f"last_reported_elapsed {elapsed!r} is not a number of seconds")
        if not _is_int(at) or not _EPOCH_2000 <= at <= latest:
            why.append(f"last_reported_at {at!r} is not a time between 2000 and now")
        if not isinstance(hours, (int, float)) or isinstance(hours, bool) or hours < 0:
            why.append(f"total_core_hours {hours!r} is not a number of core-hours")
        if completed is not None and (
            not _is_int(completed) or (completed != 0 and not _EPOCH_2000 <= completed <= latest)
        ):
            why.append(f"completed_at {completed!r} is not 0 or a time between 2000 and now")
        if why:
            problems.append(f"{where}: {'; '.join(why)}")
            continue
        jobs.append(
            OldJob(
                job_id=int(job_id),
                reported_s=int(elapsed),
                reported_at=_time(int(at)),
                core_hours=float(hours),
                completed_at=_time(int(completed)) if completed else None,
            )
        )
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        shown = problems[:_MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        raise _corrupt(path, f"{len(problems)} row(s) are not the old agent's: " + "; ".join(shown))
    return jobs


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
