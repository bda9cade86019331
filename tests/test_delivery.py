"""The exactly-once delivery of the outbox (slurm_tracker.delivery), crash point by crash point.

The randomized state machine (test_sync_machine.py) explores crashes and faults at random;
here each crash point around the POST is a fixed test, with the group commit's own rules:
a batch is marked ``sending`` (committed) before any of it is posted, outcomes are recorded in
batches, and a row left ``sending`` is looked up before it is posted again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import urllib3

from slurm_tracker import api as transport
from slurm_tracker import delivery, pipeline
from slurm_tracker.api import AllocationsClient
from slurm_tracker.delivery import ACK_BATCH, GIVE_UP_AFTER_FAILURES, MARK_BATCH, deliver_outbox
from slurm_tracker.errors import StateUnavailable
from slurm_tracker.events import plan, request_body
from slurm_tracker.models import PlannedEvent, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import OutboxUpdate, State
from tests.factories import T0, record
from tests.fake_api import BASE, FakeApi, serving

ORG = "org"
NOW = T0 + timedelta(days=1)
CPU = SkuCharge("CPU_HOUR", "cpu")


class Crash(BaseException):
    """The process dies here (not an Exception: nothing in the agent may catch it)."""


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with serving(FakeApi()) as fake:
        yield fake


def client(max_attempts: int = 3) -> AllocationsClient:
    return AllocationsClient(
        BASE, ORG, "pwt_test.secret", sleep=lambda _s: None, max_attempts=max_attempts
    )


def events(n: int) -> list[PlannedEvent]:
    out: list[PlannedEvent] = []
    for i in range(n):
        rec = record(job_id=str(5000 + i), elapsed_s=3600, start_at=T0 + timedelta(seconds=i))
        out.extend(plan(split(rec, 0, 3600), "physics", [CPU]))
    return out


def clock() -> datetime:
    return NOW


class CountingState(State):
    """Counts committed write transactions; dies at a chosen point of the delivery."""

    commits = 0
    crash_at: Optional[str] = None
    fail_outcomes = False

    @contextmanager
    def _tx(self, doing: str = "write to it") -> Iterator[sqlite3.Cursor]:
        with super()._tx(doing) as cur:
            yield cur
        self.commits += 1

    def _maybe(self, point: str) -> None:
        if self.crash_at == point:
            self.crash_at = None
            raise Crash(point)

    def mark_sending_many(self, keys: Sequence[str], now_at: datetime) -> None:
        super().mark_sending_many(keys, now_at)
        self._maybe("before-post")

    def record_outcomes(self, updates: Sequence[OutboxUpdate], now_at: datetime) -> None:
        if self.fail_outcomes:
            raise StateUnavailable("disk full")
        self._maybe("after-post")
        super().record_outcomes(updates, now_at)
        self._maybe("after-ack")


def stored(path: Path, planned: Sequence[PlannedEvent]) -> None:
    with State.open(path) as store:
        store.commit_plan(planned, [request_body(e) for e in planned], NOW, None)


def statuses(path: Path) -> dict[str, tuple[str, int, int]]:
    """What another process reads: (status, outcome_unknown, attempts) per key, committed."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT event_key, status, outcome_unknown, attempts FROM outbox")
        return {key: (status, unknown, attempts) for key, status, unknown, attempts in rows}
    finally:
        conn.close()


def run(
    path: Path, concurrency: int = 1, crash: Optional[str] = None, max_attempts: int = 3
) -> Optional[delivery.DeliveryReport]:
    with CountingState.open(path) as store:
        assert isinstance(store, CountingState)
        store.crash_at = crash
        try:
            return deliver_outbox(store, client(max_attempts), clock, concurrency)
        except Crash:
            return None


# --- the crash points around the POST ---------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_post_in_flight_is_committed_as_sending(
    tmp_path: Path, api: FakeApi, concurrency: int
) -> None:
    path = tmp_path / "state.db"
    planned = events(5)
    stored(path, planned)
    seen: list[str] = []

    def check(body: dict[str, Any]) -> None:  # runs while the POST is in flight
        seen.append(statuses(path)[body["metadata"]["eventKey"]][0])

    api.on_post = check
    report = run(path, concurrency)
    assert report is not None and report.acked == 5
    assert seen == ["sending"] * 5
    assert {s for s, _, _ in statuses(path).values()} == {"acked"}


def test_crash_after_the_mark_before_the_post_looks_up_then_posts_once(
    tmp_path: Path, api: FakeApi
) -> None:
    path = tmp_path / "state.db"
    planned = events(3)
    stored(path, planned)
    assert run(path, crash="before-post") is None
    assert api.posts == 0
    assert {s for s, _, _ in statuses(path).values()} == {"sending"}

    report = run(path)
    assert report is not None and report.acked == 3 and report.found_by_lookup == 0
    assert api.lookups == 3  # each row left sending is looked up first
    assert sorted(api.keys()) == sorted(e.event_key for e in planned)


def test_crash_after_the_post_before_the_ack_costs_a_look_up_never_a_second_post(
    tmp_path: Path, api: FakeApi
) -> None:
    path = tmp_path / "state.db"
    planned = events(3)
    stored(path, planned)
    assert run(path, crash="after-post") is None  # the API holds them, the state does not know
    assert api.posts == 3
    assert {s for s, _, _ in statuses(path).values()} == {"sending"}

    report = run(path)
    assert report is not None and report.acked == 3 and report.found_by_lookup == 3
    assert api.posts == 3  # no second POST
    assert sorted(api.keys()) == sorted(e.event_key for e in planned)
    assert {s for s, _, _ in statuses(path).values()} == {"acked"}
    with State.open(path, readonly=True) as store:  # the metrics' counters
        assert store.delivery_totals("looked_up") == {("physics", "CPU_HOUR"): 3}
        assert store.delivery_totals("dead") == {}
        assert store.posted_totals()[("physics", "CPU_HOUR")][0] == 3


def test_dead_lettered_events_are_counted_once_per_refusal(tmp_path: Path, api: FakeApi) -> None:
    path = tmp_path / "state.db"
    stored(path, events(2))
    api.faults = ["400", "ok"]
    report = run(path)
    assert report is not None and report.dead == 1 and report.acked == 1
    with State.open(path) as store:
        assert store.delivery_totals("dead") == {("physics", "CPU_HOUR"): 1}
        assert store.delivery_totals("looked_up") == {}
        assert store.retry(None, NOW) == 1
    api.faults = ["400"]
    run(path)  # refused again: counted again
    with State.open(path, readonly=True) as store:
        assert store.delivery_totals("dead") == {("physics", "CPU_HOUR"): 2}


def test_crash_after_the_ack_sends_nothing_again(tmp_path: Path, api: FakeApi) -> None:
    path = tmp_path / "state.db"
    stored(path, events(3))
    assert run(path, crash="after-ack") is None
    report = run(path)
    assert report == delivery.DeliveryReport()
    assert api.posts == 3 and api.lookups == 0


def test_a_timed_out_post_then_a_refused_look_up_leaves_the_row_flagged(
    tmp_path: Path, api: FakeApi
) -> None:
    path = tmp_path / "state.db"
    planned = events(2)
    stored(path, planned)

    def time_out(_body: dict[str, Any]) -> None:
        raise requests.exceptions.ReadTimeout("read timed out")

    api.on_post = time_out
    api.lookup_status = 401
    report = run(path)
    assert report is not None and "invalid API key" in report.auth_error
    assert report.pending == 2 and report.acked == 0
    rows = statuses(path)
    first, second = (e.event_key for e in planned)
    assert rows[first][:2] == ("pending", 1)  # may have landed: looked up before any resend
    assert api.posts == 1  # the refused key stopped the pass: the second was never posted
    assert rows[second] == ("pending", 0, 0)  # never posted: no look-up needed, no attempt
    with State.open(path) as store:
        assert [r.needs_lookup for r in store.to_send()] == [True, False]


# --- group commit -------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_marks_and_acks_are_committed_in_batches(
    tmp_path: Path, api: FakeApi, concurrency: int
) -> None:
    path = tmp_path / "state.db"
    n = 3 * MARK_BATCH + 5
    planned = events(n)
    stored(path, planned)
    with CountingState.open(path) as store:
        assert isinstance(store, CountingState)
        store.commits = 0
        report = deliver_outbox(store, client(), clock, concurrency)
        commits = store.commits
    assert report.acked == n
    batches = -(-n // MARK_BATCH) + -(-n // ACK_BATCH)
    assert commits == batches  # instead of 2 per event
    assert commits / n < 0.05
    assert len(api.keys()) == n and len(set(api.keys())) == n
    if concurrency == 1:  # batch after batch, in the order they were stored
        assert api.keys() == [e.event_key for e in planned]
    assert {row[2] for row in statuses(path).values()} == {1}  # one attempt each


def test_stop_after_three_failures_puts_unsent_rows_back_as_they_were(
    tmp_path: Path, api: FakeApi
) -> None:
    path = tmp_path / "state.db"
    planned = events(6)
    stored(path, planned)
    with State.open(path) as store:  # the last one was left sending by a crash: look it up
        store.mark_sending_many([planned[-1].event_key], NOW)

    def refused(_body: dict[str, Any]) -> None:
        reason = urllib3.exceptions.NewConnectionError(
            None,  # type: ignore[arg-type]
            "Connection refused",
        )
        raise requests.exceptions.ConnectionError(reason)

    api.on_post = refused
    report = run(path, max_attempts=1)
    assert report is not None and report.pending == 6 and "Connection refused" in report.unavailable
    assert api.posts == GIVE_UP_AFTER_FAILURES
    rows = statuses(path)
    assert [rows[e.event_key][0] for e in planned] == ["pending"] * 6
    tried = planned[:GIVE_UP_AFTER_FAILURES]
    untouched = planned[GIVE_UP_AFTER_FAILURES:-1]
    assert [rows[e.event_key][1:] for e in tried] == [(0, 1)] * len(tried)  # never left
    assert [rows[e.event_key][1:] for e in untouched] == [(0, 0)] * len(untouched)
    assert rows[planned[-1].event_key][1] == 1  # still needs its look-up


def test_a_state_file_that_cannot_record_stops_the_pass(tmp_path: Path, api: FakeApi) -> None:
    path = tmp_path / "state.db"
    stored(path, events(3))
    with CountingState.open(path) as store:
        assert isinstance(store, CountingState)
        store.fail_outcomes = True
        with pytest.raises(StateUnavailable):
            deliver_outbox(store, client(), clock, 1)
    # the acks were lost with the disk: every row stays sending, and is looked up next time
    assert {s for s, _, _ in statuses(path).values()} == {"sending"}
    report = run(path)
    assert report is not None and report.found_by_lookup == 3 and api.posts == 3


def test_concurrency_is_the_number_of_posts_in_flight(tmp_path: Path, api: FakeApi) -> None:
    path = tmp_path / "state.db"
    stored(path, events(8))
    together = threading.Barrier(4, timeout=10)  # passes only with 4 POSTs in flight at once
    broken: list[BaseException] = []

    def wait_for_the_others(_body: dict[str, Any]) -> None:
        try:
            together.wait()
        except threading.BrokenBarrierError as exc:
            broken.append(exc)

    api.on_post = wait_for_the_others
    report = run(path, concurrency=4)
    assert broken == []
    assert report is not None and report.acked == 8


def test_no_post_is_left_running_when_the_pass_fails(
    tmp_path: Path, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pass stops on a state file that cannot record while other POSTs are in flight: it
    # returns only once they have ended (nothing is sent behind the caller's back)
    path = tmp_path / "state.db"
    stored(path, events(12))
    monkeypatch.setattr(delivery, "ACK_BATCH", 1)  # record the first outcome at once
    lock = threading.Lock()
    calls: list[int] = []
    in_flight: list[int] = []

    another_started = threading.Event()

    def slow_after_the_first(_body: dict[str, Any]) -> None:
        with lock:
            calls.append(1)
            first = len(calls) == 1
            if not first:
                in_flight.append(1)
        if first:  # answered once another POST is in flight, however loaded the machine is
            another_started.wait(5)
            return
        another_started.set()
        time.sleep(0.3)
        with lock:
            in_flight.pop()

    api.on_post = slow_after_the_first
    with CountingState.open(path) as store:
        assert isinstance(store, CountingState)
        store.fail_outcomes = True
        with pytest.raises(StateUnavailable):
            deliver_outbox(store, client(), clock, 4)
        assert in_flight == []
        posts = api.posts
    time.sleep(0.5)
    assert api.posts == posts  # nothing more was sent after the pass had returned
    assert 1 < posts <= 1 + 2 * 4  # the rows in flight or queued then, not the whole outbox


def test_a_bug_in_a_worker_is_raised_and_its_row_stays_sending(
    tmp_path: Path, api: FakeApi
) -> None:
    path = tmp_path / "state.db"
    planned = events(2)
    stored(path, planned)

    def bug(_body: dict[str, Any]) -> None:
        raise ZeroDivisionError("a bug")

    api.on_post = bug
    with pytest.raises(ZeroDivisionError), CountingState.open(path) as store:
        deliver_outbox(store, client(), clock, 2)
    rows = statuses(path)
    assert rows[planned[0].event_key][0] == "sending"  # it may have left: looked up next time


def test_the_client_look_up_is_public_and_one_attempt(api: FakeApi) -> None:
    planned = events(1)[0]
    api.events.append(request_body(planned))
    found = client().lookup_usage("physics", planned.event_key)
    assert found is not None and found["usageEventId"] == "evt-1"
    api.lookup_status = 503
    with pytest.raises(Exception, match="503"):
        client().lookup_usage("physics", planned.event_key)
    assert api.lookups == 2  # no retry


def test_the_delivery_protocol_lives_apart_from_the_transport() -> None:
    assert not hasattr(transport, "deliver") and not hasattr(transport, "Delivery")
    assert not hasattr(AllocationsClient, "_find_usage")
    assert vars(pipeline)["deliver_outbox"] is delivery.deliver_outbox  # one entry point
    budget = transport.RetryBudget
    assert not hasattr(budget, "reset") and not hasattr(budget, "remaining_s")
