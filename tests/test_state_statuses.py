"""The named outbox statuses and sync outcomes (issue 10): each member IS its plain value for
every use the code and its output make of it (JSON, f-strings with and without a format spec,
``%s``, equality and hashing against strings read from the state file, SQLite parameters), on
the oldest and newest supported Pythons alike; the state module's entry point; the status
snapshot ``status`` reads."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker import health, state
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import STATUSES, OutboxStatus, State, SyncOutcome
from tests.factories import record

NOW = datetime(2026, 3, 11, tzinfo=timezone.utc)
CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
MEMBERS = [*OutboxStatus, *SyncOutcome]

#: Run by each interpreter: every way the code shows a member gives its plain value.
CHECK = """
import json, sqlite3, sys
from slurm_tracker.statuses import OutboxStatus, SyncOutcome
for m in [*OutboxStatus, *SyncOutcome]:
    v = m.value
    shown = [str(m), f"{m}", "%s" % m, "{}".format(m), format(m), json.dumps(m)[1:-1]]
    assert shown == [v] * 6, (sys.version, m, shown)
    assert f"{m:>12}|{m:<3}" == f"{v:>12}|{v:<3}", (sys.version, m)
    assert json.dumps({m: [m]}) == json.dumps({v: [v]}), (sys.version, m)
    assert m == v and hash(m) == hash(v) and v in {m} and m in {v}, (sys.version, m)
    got = sqlite3.connect(":memory:").execute("SELECT ?, typeof(?)", (m, m)).fetchone()
    assert got == (v, "text"), (sys.version, m, got)
print("ok")
"""


@pytest.mark.parametrize("member", MEMBERS, ids=str)
def test_a_member_shows_as_its_value(member: OutboxStatus | SyncOutcome) -> None:
    value = member.value
    shown = "%s" % member  # noqa: UP031 (how logging shows it)
    assert [str(member), f"{member}", shown, format(member, ">9")] == [
        value,
        value,
        value,
        f"{value:>9}",
    ]
    assert json.dumps({member: member}) == f'{{"{value}": "{value}"}}'
    assert member == value and {value: 1}[member] == 1


def _interpreters() -> list[str]:
    found = []
    for version in ("3.9", "3.13"):
        root = Path("/root/.pyenv/versions")
        candidates = sorted(root.glob(f"{version}.*/bin/python")) if root.is_dir() else []
        found += [str(c) for c in candidates[-1:]]
    return found


@pytest.mark.parametrize("python", _interpreters() or ["missing"])
def test_members_show_the_same_on_the_oldest_and_newest_python(python: str) -> None:
    """Python 3.12 changed format() of mixed-in enums to the member's name: run the checks
    under Python 3.9 and 3.13 (from pyenv; skipped where they are not installed)."""
    if python == "missing":
        pytest.skip("no Python 3.9 or 3.13 under /root/.pyenv/versions on this machine")
    done = subprocess.run(
        [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{CHECK}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_statuses_are_the_schema_s_and_the_outcomes_those_health_counts() -> None:
    assert STATUSES == ("pending", "held", "sending", "acked", "dead", "dropped")
    assert tuple(OutboxStatus) == STATUSES
    assert {"ok", "undelivered"} == set(health.SUCCESS_OUTCOMES)
    assert health.FAILED == "failed" and health.FAILED is SyncOutcome.FAILED
    assert json.dumps({"outcome": health.FAILED}) == '{"outcome": "failed"}'


def test_the_entry_point_exports_what_its_importers_use() -> None:
    for name in state.__all__:
        assert getattr(state, name) is not None, name
    assert {"State", "StateLock", "OutboxRow", "OutboxUpdate", "SCHEMA_VERSION"} <= set(
        state.__all__
    )
    assert state.State.__module__ == "slurm_tracker.state"


def _stored(path: Path) -> State:
    store = State.open(path)
    for job, ended in (("1", 3600), ("2", 1800)):
        events = plan(split(record(job_id=job, elapsed_s=ended), 0, ended), "physics", [CPU])
        store.commit_plan(events, [request_body(e) for e in events], NOW, NOW)
    return store


def test_rows_come_back_with_their_named_status(tmp_path: Path) -> None:
    with _stored(tmp_path / "s.db") as store:
        rows = store.outbox()
        assert rows and all(type(r.status) is OutboxStatus for r in rows)
        store.mark_sending_many([rows[0].event_key], NOW)
        assert store.outbox()[0].status is OutboxStatus.SENDING
        assert store.outbox()[0].needs_lookup


def test_the_status_snapshot_is_what_the_single_queries_say(tmp_path: Path) -> None:
    with _stored(tmp_path / "s.db") as store:
        keys = [r.event_key for r in store.outbox()]
        store.mark_sending_many(keys[:1], NOW)
        store.mark_acked(keys[0], "id-1", datetime.now(timezone.utc))
        store.record_sync(NOW, NOW, SyncOutcome.UNDELIVERED, {"posted": 1})
        since = (NOW - timedelta(days=1), datetime.now(timezone.utc) - timedelta(hours=1))
        snap = store.status_snapshot(since)
        waiting = store.outbox(("pending", "sending"), limit=1)
        assert snap.high_water_at == store.high_water_at() == NOW
        assert snap.outbox == store.counts() and snap.outbox["acked"] == 1
        assert snap.oldest_waiting_at == waiting[0].created_at == store.oldest_waiting_at()
        assert snap.quarantined == store.quarantine_count() == 0
        assert snap.open_corrections == store.correction_count() == 0
        assert snap.acked_since == tuple(store.totals_since(at) for at in since)
        assert snap.acked_since[1][0][3] == 1  # the acknowledgement of the last hour
        assert snap.last_sync == store.last_sync()
        assert snap.last_sync is not None and snap.last_sync["outcome"] == "undelivered"
        raw = sqlite3.connect(tmp_path / "s.db").execute("SELECT outcome FROM syncs").fetchall()
        assert raw == [("undelivered",)]


def test_no_waiting_event_has_no_age(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store:
        assert store.oldest_waiting_at() is None
        assert store.status_snapshot(()).oldest_waiting_at is None
