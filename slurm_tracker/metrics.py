"""Prometheus metrics in the node_exporter textfile format (``monitoring.metrics_file``).

Written atomically (0644) after every sync, success or failure, whenever the state can be
read. The planned, posted-event and usage counters come from cumulative totals the state
keeps as events are stored and acknowledged (State.posted_totals, State.planned_totals), so
pruning acknowledged events never lowers them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Optional

from slurm_tracker import health
from slurm_tracker.errors import TrackerError
from slurm_tracker.files import write_atomically
from slurm_tracker.state import State
from slurm_tracker.statuses import WAITING

log = logging.getLogger(__name__)

PREFIX = "slurm_tracker_"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int | Decimal) -> str:
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return text if text not in ("-0",) else "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float | int | Decimal]],
    ) -> None:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(
                f"{full}{{{shown}}} {_number(value)}" if shown else f"{full} {_number(value)}"
            )

    def gauge(self, name: str, help_text: str, value: Optional[float | int]) -> None:
        """A gauge without labels; left out (no sample) when not known."""
        self.family(name, "gauge", help_text, [] if value is None else [({}, value)])


def _ts(at: Optional[datetime]) -> Optional[int]:
    return int(at.timestamp()) if at is not None else None


def render(
    store: State,
    state_path: Path,
    now_at: datetime,
    totals: Mapping[tuple[str, str], tuple[int, Decimal]],
    planned: Mapping[tuple[str, str], tuple[int, Decimal]],
) -> str:
    history = health.sync_history(store, state_path)
    last = history["lastSync"]
    summary = last["summary"] if last else {}
    duration = (
        int((last["finishedAt"] - last["startedAt"]).total_seconds()) if last is not None else None
    )
    counts = store.counts()
    oldest = store.oldest_waiting_at()
    high = store.high_water_at()
    w = _Writer()
    w.gauge(
        "last_success_timestamp_seconds",
        "Unix time the last successful sync finished (outcome ok or undelivered).",
        _ts(history["lastSuccessAt"]),
    )
    w.gauge(
        "last_attempt_timestamp_seconds",
        "Unix time the last sync, successful or not, finished.",
        _ts(history["lastAttemptAt"]),
    )
    w.gauge(
        "last_sync_success",
        "1 if the last recorded sync succeeded, else 0.",
        None if last is None else int(last["outcome"] in health.SUCCESS_OUTCOMES),
    )
    w.gauge(
        "failed_syncs_in_a_row",
        "Failed syncs since the last successful one.",
        history["failedInARow"],
    )
    w.gauge("sync_duration_seconds", "Wall-clock duration of the last recorded sync.", duration)
    for key, what in (
        ("records", "read"),
        ("skipped", "skipped"),
        ("rejected", "rejected and quarantined"),
    ):
        value = summary.get(key)
        w.gauge(
            f"last_sync_records_{'read' if key == 'records' else key}",
            f"sacct records {what} by the last sync.",
            int(value) if isinstance(value, int) else None,
        )
    w.family(
        "events_posted_total",
        "counter",
        "Usage events acknowledged by the API, since the state file was created.",
        [({"allocation": a, "sku": s}, n) for (a, s), (n, _) in sorted(totals.items())],
    )
    for kind, name, meaning in (
        (
            "looked_up",
            "events_looked_up_total",
            "acknowledged because a look-up of its key "
            "found it on the API (its acknowledgement had been lost)",
        ),
        ("dead", "events_dead_lettered_total", "dead-lettered (refused by the API)"),
    ):
        w.family(
            name,
            "counter",
            f"Usage events {meaning}, since the state file was created.",
            [
                ({"allocation": a, "sku": s}, n)
                for (a, s), n in sorted(store.delivery_totals(kind).items())  # type: ignore[arg-type]
            ],
        )
    w.family(
        "usage_posted_total",
        "counter",
        "Usage posted and acknowledged, in the SKU's unit (hours for *_HOUR SKUs).",
        [({"allocation": a, "sku": s}, q) for (a, s), (_, q) in sorted(totals.items())],
    )
    w.family(
        "events_planned_total",
        "counter",
        "Usage events planned into the outbox, since the state file was created.",
        [({"allocation": a, "sku": s}, n) for (a, s), (n, _) in sorted(planned.items())],
    )
    w.family(
        "outbox_events",
        "gauge",
        "Events in the outbox not yet delivered, by status.",
        [({"status": s}, counts.get(s, 0)) for s in WAITING],
    )
    w.family(
        "outbox_events_by_sku",
        "gauge",
        "Events in the outbox not yet delivered, by status, allocation and SKU.",
        [
            ({"status": status, "allocation": a, "sku": s}, n)
            for (status, a, s), n in sorted(store.waiting_by_sku().items())
        ],
    )
    w.gauge(
        "oldest_pending_age_seconds",
        "Age of the oldest event waiting to be delivered (0 when none).",
        int((now_at - oldest).total_seconds()) if oldest is not None else 0,
    )
    w.gauge(
        "high_water_lag_seconds",
        "How far the high-water mark (end of the last sacct window read) is behind now.",
        int((now_at - high).total_seconds()) if high else None,
    )
    w.gauge("quarantined_records", "Open quarantined (rejected) records.", store.quarantine_count())
    return "\n".join(w.lines) + "\n"


def write_metrics(path: Path, store: State, now_at: datetime) -> None:
    """Write the file. Best effort: a problem is logged as a warning, never raised (a sync's
    own outcome and exit code come first)."""
    try:
        text = render(store, store.path, now_at, store.posted_totals(), store.planned_totals())
        write_atomically(path, text.encode(), mode=0o644)
    except (TrackerError, OSError, ValueError) as exc:
        log.warning("could not write the metrics file %s: %s", path, exc)
