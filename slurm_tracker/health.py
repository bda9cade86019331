"""Health an admin can alert on: every sync outcome recorded, and `status --check`.

Where a sync's outcome goes:

- a sync that gets as far as opening the state under its lock records its outcome in the
  state's ``syncs`` table, failures included (outcome ``failed`` with the exit code and a
  one-line reason; ``unavailable`` and ``auth`` are recorded by the pipeline itself);
- a failure before that (API key missing, catalog invalid, the lock held by another sync, the
  state unreadable, a full disk) cannot write the state: it leaves ``<state>.last-failure``
  beside it instead, a small JSON file (0600, written atomically) with the time, exit code,
  reason and how many such failures ran in a row. A successful sync removes it.
- a configuration that cannot be read names no state: its failure is only on stderr/the log.

Recording is best effort: it never masks the original error nor changes the exit code.

`status --check` follows the Nagios plugin conventions: exit 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN, one line ``SLURM-TRACKER STATE - summary | perfdata``. A metric alerts when it
exceeds its threshold (Nagios range semantics: a warning of 0 events warns on any event).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from slurm_tracker.config import MONITORING_THRESHOLDS
from slurm_tracker.errors import TrackerError
from slurm_tracker.files import write_atomically
from slurm_tracker.state import State
from slurm_tracker.statuses import OutboxStatus, SyncOutcome
from slurm_tracker.times import utc_text

log = logging.getLogger(__name__)

#: Outcomes of a sync that read sacct and committed its plan (undelivered events are measured
#: by their own thresholds); any other outcome is a failed sync.
SUCCESS_OUTCOMES = frozenset({SyncOutcome.OK, SyncOutcome.UNDELIVERED})
FAILED = SyncOutcome.FAILED
FAILURE_SUFFIX = ".last-failure"
REASON_MAX = 300

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= REASON_MAX else line[:REASON_MAX] + "..."


# ------------------------------------------------------------------ recording failures
def failure_trace_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + FAILURE_SUFFIX)


def read_failure_trace(state_path: Path) -> Optional[dict[str, Any]]:
    """The sidecar of failures that could not write the state, or None (absent or unreadable:
    a damaged sidecar is ignored, it is only a hint)."""
    try:
        data = json.loads(failure_trace_path(state_path).read_text(encoding="utf-8"))
        return {
            "failedAt": datetime.fromtimestamp(int(data["failedAt"]), timezone.utc),
            "exitCode": int(data["exitCode"]),
            "reason": str(data["reason"]),
            "consecutive": max(int(data["consecutive"]), 1),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_failure_trace(state_path: Path, at: datetime, code: int, reason: str) -> None:
    """Best effort: leave ``<state>.last-failure``; a problem writing it is only logged."""
    previous = read_failure_trace(state_path)
    data = {
        "failedAt": int(at.timestamp()),
        "exitCode": code,
        "reason": one_line(reason),
        "consecutive": (previous["consecutive"] if previous else 0) + 1,
    }
    try:
        write_atomically(
            failure_trace_path(state_path),
            (json.dumps(data) + "\n").encode(),
            mode=0o600,
        )
    except (OSError, TrackerError) as exc:
        log.debug("could not record the failed sync beside %s: %s", state_path, exc)


def clear_failure_trace(state_path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(failure_trace_path(state_path))


def record_failed_sync(
    store: Optional[State],
    state_path: Path,
    started_at: datetime,
    code: int,
    reason: str,
    kind: str = "sync",
) -> None:
    """Record a failed sync (or backfill) in the state (when open and writable), else, for a
    sync, in the sidecar (a backfill is run by a person, who sees its error)."""
    now_at = datetime.now(timezone.utc)
    summary: dict[str, Any] = {"exitCode": code, "reason": one_line(reason)}
    if kind != "sync":
        summary["kind"] = kind
    if store is not None and not store.readonly:
        try:
            store.record_sync(started_at, now_at, FAILED, summary)
            return
        except (TrackerError, OSError) as exc:
            log.debug("the state could not record the failed %s: %s", kind, exc)
    if kind == "sync":
        write_failure_trace(state_path, now_at, code, reason)


# ------------------------------------------------------------------ the check
@dataclass(frozen=True)
class Metric:
    name: str  # the config key of its thresholds
    value: Optional[int]  # None: not measurable (e.g. no high-water mark yet)
    unit: str  # "s" or ""
    warning: int
    critical: int

    @property
    def state(self) -> int:
        if self.value is None:
            return OK
        if self.value > self.critical:
            return CRITICAL
        return WARNING if self.value > self.warning else OK

    def perfdata(self) -> str:
        value = "U" if self.value is None else f"{self.value}{self.unit}"
        return f"{self.name}={value};{self.warning};{self.critical};0;"

    def json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": self.unit or None,
            "warning": self.warning,
            "critical": self.critical,
            "state": STATE_NAMES[self.state],
        }


@dataclass(frozen=True)
class CheckResult:
    state: int
    summary: str
    metrics: tuple[Metric, ...] = ()

    def line(self) -> str:
        perf = " ".join(m.perfdata() for m in self.metrics)
        head = f"SLURM-TRACKER {STATE_NAMES[self.state]} - {self.summary}"
        return f"{head} | {perf}" if perf else head

    def json(self) -> dict[str, Any]:
        return {
            "state": STATE_NAMES[self.state],
            "exitCode": self.state,
            "summary": self.summary,
            "line": self.line(),
            "metrics": {m.name: m.json() for m in self.metrics},
        }


def unknown(reason: str) -> CheckResult:
    return CheckResult(UNKNOWN, one_line(reason))


def sync_history(store: State, state_path: Path) -> dict[str, Any]:
    """The last success, the last attempt and the failed syncs in a row (state and sidecar).

    Backfills are recorded too (``summary.kind``) but are not syncs: they neither count as
    failed syncs nor hide them."""
    syncs = [r for r in store.recent_syncs() if r["summary"].get("kind", "sync") == "sync"]
    trace = read_failure_trace(state_path)
    failed = 0
    last_success: Optional[datetime] = None
    for row in syncs:
        if row["outcome"] in SUCCESS_OUTCOMES:
            last_success = row["finishedAt"]
            break
        failed += 1
    if trace is not None and (last_success is None or trace["failedAt"] >= last_success):
        failed += trace["consecutive"]
    attempts = [row["finishedAt"] for row in syncs[:1]]
    if trace is not None:
        attempts.append(trace["failedAt"])
    last_failure: Optional[dict[str, Any]] = None
    failures = [r for r in syncs if r["outcome"] not in SUCCESS_OUTCOMES][:1]
    if failures:
        row = failures[0]
        last_failure = {
            "at": row["finishedAt"],
            "outcome": row["outcome"],
            "exitCode": row["summary"].get("exitCode"),
            "reason": row["summary"].get("reason", ""),
        }
    if trace is not None and (last_failure is None or trace["failedAt"] >= last_failure["at"]):
        last_failure = {
            "at": trace["failedAt"],
            "outcome": FAILED,
            "exitCode": trace["exitCode"],
            "reason": trace["reason"],
        }
    return {
        "recorded": len(syncs) + (trace["consecutive"] if trace else 0),
        "lastSuccessAt": last_success,
        "lastAttemptAt": max(attempts) if attempts else None,
        "failedInARow": failed,
        "lastFailure": last_failure,
        "lastSync": syncs[0] if syncs else None,
    }


def age_text(seconds: int) -> str:
    """``90 s``, ``12 min``, ``5 h``, ``3 days``."""
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _seconds(now_at: datetime, at: Optional[datetime]) -> Optional[int]:
    return None if at is None else max(int((now_at - at).total_seconds()), 0)


def check(
    store: State, state_path: Path, thresholds: Mapping[str, tuple[int, int]], now_at: datetime
) -> CheckResult:
    """Measure the state against the thresholds (see MONITORING_THRESHOLDS)."""
    history = sync_history(store, state_path)
    if history["recorded"] == 0:
        return unknown(f"no sync recorded in {state_path} yet")
    counts = store.counts()
    oldest = store.oldest_waiting_at()
    high = store.high_water_at()
    values: dict[str, Optional[int]] = {
        "last_success_age": _seconds(now_at, history["lastSuccessAt"]),
        "high_water_lag": _seconds(now_at, high),
        "failed_syncs": history["failedInARow"],
        "dead_events": counts.get(OutboxStatus.DEAD, 0),
        "held_events": counts.get(OutboxStatus.HELD, 0),
        "pending_events": counts.get(OutboxStatus.PENDING, 0) + counts.get(OutboxStatus.SENDING, 0),
        "oldest_pending_age": _seconds(now_at, oldest) if oldest is not None else 0,
        "quarantined": store.quarantine_count(),
    }
    metrics = tuple(
        Metric(
            name,
            values[name],
            "s" if kind == "duration" else "",
            *thresholds.get(name, (warn, crit)),
        )
        for name, (kind, warn, crit) in MONITORING_THRESHOLDS.items()
    )
    problems = [_problem(m, history) for m in metrics if m.state != OK]
    state = max((m.state for m in metrics), default=OK)
    if history["lastSuccessAt"] is None:
        state = CRITICAL
        problems.insert(0, f"no successful sync among the last {history['recorded']} recorded")
    good = values["last_success_age"]
    tail = f"last good sync {age_text(good)} ago" if good is not None else ""
    problems = [p for p in problems if p]
    summary = "; ".join([*problems, tail] if tail else problems) or "no sync problem"
    return CheckResult(state, summary, metrics)


def _problem(metric: Metric, history: Mapping[str, Any]) -> str:
    value = metric.value or 0
    if metric.name == "last_success_age":
        return ""  # always said at the end
    if metric.name == "failed_syncs":
        failure = history["lastFailure"] or {}
        return (
            f"{value} failed syncs in a row (last: exit {failure.get('exitCode')}, "
            f"{one_line(failure.get('reason') or failure.get('outcome', ''))[:120]})"
        )
    texts = {
        "high_water_lag": f"high-water mark {age_text(value)} behind",
        "dead_events": f"{value} dead events",
        "held_events": f"{value} held events",
        "pending_events": f"{value} pending events",
        "oldest_pending_age": f"oldest pending event {age_text(value)} old",
        "quarantined": f"{value} quarantined records",
    }
    return texts[metric.name]


def check_state_file(
    state_path: Path, thresholds: Mapping[str, tuple[int, int]], now_at: datetime
) -> CheckResult:
    """The check of a state file on disk: UNKNOWN when it is missing or unreadable."""
    if not os.path.lexists(state_path):
        trace = read_failure_trace(state_path)
        if trace is not None:
            return unknown(
                f"no state file at {state_path}; {trace['consecutive']} failed syncs "
                f"(last: exit {trace['exitCode']}, {trace['reason'][:120]})"
            )
        return unknown(f"no state file at {state_path} (no sync has run yet?)")
    try:
        with State.open(state_path, readonly=True) as store:
            return check(store, state_path, thresholds, now_at)
    except (TrackerError, OSError, ValueError) as exc:
        return unknown(f"state file {state_path} unreadable: {exc}")


def json_times(history: Mapping[str, Any]) -> dict[str, Any]:
    """``sync_history`` with RFC 3339 times, for `status --output json`."""

    def iso(at: Optional[datetime]) -> Optional[str]:
        return utc_text(at) if at else None

    failure = history["lastFailure"]
    return {
        "lastSuccessAt": iso(history["lastSuccessAt"]),
        "lastAttemptAt": iso(history["lastAttemptAt"]),
        "failedSyncsInARow": history["failedInARow"],
        "lastFailure": None if failure is None else {**failure, "at": iso(failure["at"])},
    }
