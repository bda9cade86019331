"""The state file's schema: its version, its tables as each version made them, and the
migrations between them (run by :meth:`state.State.open`, in one transaction).

Outbox statuses: see :class:`statuses.OutboxStatus`. Sizes and retention periods the other
state modules share are defined here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slurm_tracker.statuses import OutboxStatus

SCHEMA_VERSION = 4
APPLICATION_ID = 0x534C5452  # "SLTR" in the SQLite header: this file is a slurm-tracker state
STATUSES = tuple(s.value for s in OutboxStatus)  # pending, held, sending, acked, dead, dropped
QUARANTINE_TEXT_MAX = 1000  # characters kept of a quarantined record's text and reason

PROGRESS_COLUMNS = "run, reported_s, last_end_at, final, updated_at"
OUTBOX_COLUMNS = (
    "event_key, allocation, sku, quantity, started_at, ended_at, body, status, attempts, "
    "outcome_unknown, last_error, event_id, created_at, updated_at"
)
QUARANTINE_COLUMNS = (
    "key, job_id, reason, text, first_seen_at, last_seen_at, times_seen, resolved_at"
)
CORRECTION_COLUMNS = (
    "run, job_id, allocations, skus, billed_s, actual_s, record, status, removed, attempts, "
    "note, first_seen_at, last_seen_at, times_seen, updated_at, resolved_at"
)
CORRECTION_STATUSES = ("open", "applied", "dismissed")
RECORD_RETENTION_S = 30 * 86400  # dropped events and resolved quarantine entries: kept this long
#: Without a high-water mark (only saved sacct files were read), a final run's progress is kept
#: this much longer than a live window would need, behind the newest billed end (State.prune).
SAVED_FILE_SLACK_S = 7 * 86400
HOURS_KEPT = 31 * 24  # hours of acknowledged totals kept for `status` (its last 30 days)
VACUUM_FREE_SHARE = 4  # a prune leaving more than 1/4 of the pages free gives them back
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # the -wal file is truncated to this after a checkpoint


def outbox_ddl(table: str, statuses: Sequence[str]) -> str:
    allowed = ", ".join(f"'{s}'" for s in statuses)
    return f"""CREATE TABLE {table} (
            event_key TEXT PRIMARY KEY,
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            started_at INTEGER NOT NULL,
            ended_at INTEGER NOT NULL,
            body TEXT NOT NULL,            -- the JSON request body
            status TEXT NOT NULL CHECK (status IN
                ({allowed})),
            attempts INTEGER NOT NULL DEFAULT 0,
            outcome_unknown INTEGER NOT NULL DEFAULT 0,  -- an earlier attempt may have landed
            last_error TEXT NOT NULL DEFAULT '',
            event_id TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )"""


MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE progress (
            run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
            reported_s INTEGER NOT NULL,   -- elapsed seconds billed so far
            last_end_at INTEGER NOT NULL,  -- wall-clock end of the last billed segment (epoch)
            final INTEGER NOT NULL,        -- the run has ended and is fully billed
            updated_at INTEGER NOT NULL
        )""",
        outbox_ddl("outbox", ("pending", "sending", "acked", "dead", "dropped")),
        "CREATE INDEX outbox_status ON outbox (status, created_at)",
        """CREATE TABLE syncs (
            id INTEGER PRIMARY KEY,
            started_at INTEGER NOT NULL,
            finished_at INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            summary TEXT NOT NULL          -- JSON counts
        )""",
    ),
    2: (
        # SQLite cannot alter a CHECK constraint: rebuild the outbox (in the same transaction)
        outbox_ddl("outbox_v2", STATUSES),
        f"INSERT INTO outbox_v2 ({OUTBOX_COLUMNS}) SELECT {OUTBOX_COLUMNS} FROM outbox",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_v2 RENAME TO outbox",
        "CREATE INDEX outbox_status ON outbox (status, created_at)",
        """CREATE TABLE quarantine (
            key TEXT PRIMARY KEY,          -- a run's identity text, or a hash of a record's text
            job_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            text TEXT NOT NULL,            -- a snippet of the record
            first_seen_at INTEGER NOT NULL,
            last_seen_at INTEGER NOT NULL,
            times_seen INTEGER NOT NULL DEFAULT 1,
            resolved_at INTEGER            -- NULL while open
        )""",
        "CREATE INDEX quarantine_open ON quarantine (resolved_at, first_seen_at)",
    ),
    3: (
        """CREATE TABLE corrections (
            run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
            job_id TEXT NOT NULL,
            allocations TEXT NOT NULL,     -- JSON list: where the mapping bills the run
            skus TEXT NOT NULL,            -- JSON list of SKU codes
            billed_s INTEGER NOT NULL,     -- elapsed seconds billed (the run's progress)
            actual_s INTEGER NOT NULL,     -- slurmdbd's ElapsedRaw, as last seen
            record TEXT NOT NULL,          -- JSON: the record as last seen (corrections.py)
            status TEXT NOT NULL CHECK (status IN ('open', 'applied', 'dismissed')),
            removed TEXT NOT NULL DEFAULT '[]',  -- JSON: stretches deleted on the API so far
            attempts INTEGER NOT NULL DEFAULT 0,
            note TEXT NOT NULL DEFAULT '', -- why it is still open, or why it was dismissed
            first_seen_at INTEGER NOT NULL,
            last_seen_at INTEGER NOT NULL,
            times_seen INTEGER NOT NULL DEFAULT 1,
            updated_at INTEGER NOT NULL,
            resolved_at INTEGER            -- NULL while open
        )""",
        "CREATE INDEX corrections_status ON corrections (status, first_seen_at)",
    ),
    4: (
        # progress WITHOUT ROWID: the run's text is stored once (not again in an index)
        """CREATE TABLE progress_v4 (
            run TEXT PRIMARY KEY,          -- cluster:jobidraw:submit-epoch
            reported_s INTEGER NOT NULL,   -- elapsed seconds billed so far
            last_end_at INTEGER NOT NULL,  -- wall-clock end of the last billed segment (epoch)
            final INTEGER NOT NULL,        -- the run has ended and is fully billed
            updated_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        f"INSERT INTO progress_v4 ({PROGRESS_COLUMNS}) SELECT {PROGRESS_COLUMNS} FROM progress",
        "DROP TABLE progress",
        "ALTER TABLE progress_v4 RENAME TO progress",
        "CREATE INDEX progress_pruning ON progress (last_end_at) WHERE final=1",
        "CREATE INDEX outbox_settled ON outbox (status, updated_at)",
        """CREATE TABLE totals (           -- cumulative, never lowered (the metrics' counters)
            kind TEXT NOT NULL CHECK (kind IN ('planned', 'posted', 'looked_up', 'dead')),
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            events INTEGER NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            PRIMARY KEY (kind, allocation, sku)
        ) WITHOUT ROWID""",
        """CREATE TABLE acked_hours (      -- acknowledged per hour (`status`), HOURS_KEPT of them
            hour INTEGER NOT NULL,         -- epoch seconds // 3600 of the acknowledgement
            allocation TEXT NOT NULL,
            sku TEXT NOT NULL,
            events INTEGER NOT NULL,
            quantity TEXT NOT NULL,        -- decimal text
            PRIMARY KEY (hour, allocation, sku)
        ) WITHOUT ROWID""",
    ),
}
TABLES: Mapping[int, frozenset[str]] = {
    1: frozenset({"meta", "progress", "outbox", "syncs"}),
    2: frozenset({"meta", "progress", "outbox", "syncs", "quarantine"}),
    3: frozenset({"meta", "progress", "outbox", "syncs", "quarantine", "corrections"}),
    4: frozenset(
        {"meta", "progress", "outbox", "syncs", "quarantine", "corrections", "totals"}
        | {"acked_hours"}
    ),
}
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
