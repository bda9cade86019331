"""Builders of what the older Go agent (parallelworks/slurm-tracker) leaves behind, written
from the schema described in issue 13 (not copied from anywhere): its SQLite state
``job_states``, its JSON config, and the body of a usage event it posts (core-hours, metadata
``jobId``/``user``/``partition``/``cluster``/``account``/``qos``, no key of ours).

Its conventions, as the issue describes them: per numeric job id (the JobIDRaw), the elapsed
seconds already billed (``last_reported_elapsed``) and until when (``last_reported_at``: Start +
those seconds while the job runs, End once it ended); ``completed_at`` is 0 while it runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

SCHEMA = """CREATE TABLE job_states (
    job_id INTEGER PRIMARY KEY,
    last_reported_elapsed INTEGER NOT NULL,
    last_reported_at INTEGER NOT NULL,
    total_core_hours REAL NOT NULL,
    completed_at INTEGER NOT NULL DEFAULT 0
)"""


@dataclass(frozen=True)
class OldRow:
    """One job the old agent billed: ``elapsed_s`` seconds of a run that started at
    ``start_at`` on ``cpus`` cores; ``ended_at`` set once it saw the job end."""

    job_id: int
    start_at: datetime
    elapsed_s: int
    cpus: int = 1
    ended_at: Optional[datetime] = None  # the run's End, when the old agent saw it end
    completed_at: Optional[datetime] = None  # when it noticed (default: End + a minute)

    @property
    def reported_at(self) -> datetime:
        return self.ended_at or self.start_at + timedelta(seconds=self.elapsed_s)

    @property
    def core_hours(self) -> float:
        return self.cpus * self.elapsed_s / 3600

    def values(self) -> tuple[int, int, int, float, int]:
        completed = 0
        if self.ended_at is not None:
            completed = int((self.completed_at or self.ended_at + timedelta(minutes=1)).timestamp())
        return (
            self.job_id,
            self.elapsed_s,
            int(self.reported_at.timestamp()),
            self.core_hours,
            completed,
        )


def write_old_state(path: Path, rows: Iterable[OldRow]) -> Path:
    """The Go agent's state file with ``rows``."""
    return write_raw_old_state(path, [row.values() for row in rows])


def write_raw_old_state(path: Path, values: Iterable[Sequence[Any]]) -> Path:
    """The same table with any values (for bad input)."""
    conn = sqlite3.connect(str(path))
    try:
        conn.execute(SCHEMA)
        conn.execute("CREATE INDEX idx_completed_at ON job_states(completed_at)")
        conn.executemany("INSERT INTO job_states VALUES (?, ?, ?, ?, ?)", list(values))
        conn.commit()
    finally:
        conn.close()
    return path


def old_config(
    partitions: Mapping[str, str],
    accounts: Mapping[str, str],
    default_sku: str = "",
    default_allocation: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The Go agent's JSON config (``extra``: keys it does not know, for bad input)."""
    doc: dict[str, Any] = {
        "defaultSku": default_sku,
        "defaultAllocation": default_allocation,
        "partition": [{"name": n, "sku": s} for n, s in partitions.items()],
        "account": [{"name": n, "allocation": a} for n, a in accounts.items()],
    }
    doc.update(extra)
    return doc


def write_old_config(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def rfc3339(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(
    *,
    job_id: int,
    sku: str,
    cpus: int,
    start_at: datetime,
    from_s: int,
    to_s: int,
    user: str,
    partition: str,
    cluster: str,
    account: str,
    qos: str = "normal",
) -> dict[str, Any]:
    """The request body the old agent posts for elapsed seconds [from_s, to_s) of a run that
    started at ``start_at``: dated Start + seconds, core-hours, its metadata."""
    return {
        "sku": sku,
        "quantity": cpus * (to_s - from_s) / 3600,
        "startedAt": rfc3339(start_at + timedelta(seconds=from_s)),
        "endedAt": rfc3339(start_at + timedelta(seconds=to_s)),
        "user": user,
        "metadata": {
            "jobId": job_id,
            "user": user,
            "partition": partition,
            "cluster": cluster,
            "account": account,
            "qos": qos,
        },
    }
