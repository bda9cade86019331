"""Exactly-once delivery of the outbox over an API without idempotency.

The HTTP transport (requests, timeouts, retries, the classification of failures) is
:mod:`slurm_tracker.api`; this module is the protocol on top of it: which outbox rows are sent,
what is recorded in the state file before and after, when a key is looked up instead of being
posted, and when a delivery pass gives up.

The protocol (DESIGN.md, "Exactly once over an API without idempotency"):

1. **Mark before sending.** Rows are read from the outbox in the order they were stored, a
   batch of up to :data:`MARK_BATCH` at a time (never the whole backlog at once). Each batch
   is marked ``sending`` in ONE committed transaction (:meth:`State.mark_sending_many`)
   *before* any of its events is posted: no POST ever leaves while the state file could still
   say ``pending`` for its key.
2. **Look up what may have landed.** A row that was ``sending`` (or flagged
   ``outcome_unknown``) when the pass read it may have reached the API in an earlier attempt,
   in this process or a dead one: :func:`deliver` looks its key up (list endpoint,
   ``metadata`` filter, exact match checked here) and acks the event it finds instead of
   posting. The same happens between retries of one event after an attempt whose outcome is
   unknown (timeout, reset after sending, 5xx). Only failures where the request provably never
   left (:class:`api.NotSent`) and 429 are resent without a look-up.
3. **Acknowledge in batches.** Outcomes (acked with the API's id, dead-lettered, or pending
   with a sticky ``outcome_unknown``) are written by :meth:`State.record_outcomes`, up to
   :data:`ACK_BATCH` rows per transaction and always before the pass returns. An ack is only
   written after the API answered 2xx with an id, or the look-up found the key.

Why that is exactly once, whatever instant the process dies at:

- before a batch's mark is committed: its rows are still ``pending`` and none was posted in
  this pass: they are posted by the next pass (nothing lost, nothing doubled);
- after the mark, before or during a POST, or after the API accepted it but before the ack
  is committed (a *lost acknowledgement*): the row is durably ``sending``, so the next pass
  looks its key up first: found, it is acked without a second POST; not found, the POST never
  took effect and it is posted now. A lost acknowledgement costs one look-up, never a
  duplicate; batching acknowledgements only makes the look-ups more numerous after a crash
  (at most :data:`MARK_BATCH` + :data:`ACK_BATCH` + the requests in flight);
- a row marked ``sending`` but never posted (the pass stopped: API down, rejected key) is put
  back to ``pending`` with its earlier ``outcome_unknown`` kept, so a later pass looks it up
  only if it needed a look-up already (if that write is lost, it is looked up: harmless).

This depends on what DESIGN.md assumes of the API: an accepted event is listed (and found by
its key) from the moment the POST answers or its connection drops, and a single writer per
state file (the state lock). 4xx other than 408/429 dead-letter the event; 401/403 and a
refused look-up stop the pass (the event stays pending, flagged for a look-up); so do
:data:`GIVE_UP_AFTER_FAILURES` undeliverable events in a row (the API is down: the rest waits
for the next sync instead of holding this one for hours). A state file that cannot record
(disk full) stops the pass at once.

Costs: one commit (one fsync of the WAL) per :data:`MARK_BATCH` events to mark and about one
per :data:`ACK_BATCH` to acknowledge, instead of two per event; up to ``concurrency``
requests are in flight at any time, the main thread marking and recording while the workers
send.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Literal, Optional, Union

from slurm_tracker import errors, state
from slurm_tracker.api import (
    AllocationsClient,
    DeliveryFailed,
    FatalApiError,
    RequestFailed,
)
from slurm_tracker.statuses import OutboxStatus

log = logging.getLogger(__name__)

GIVE_UP_AFTER_FAILURES = 3  # undeliverable events in a row that end a delivery pass
MARK_BATCH = 64  # rows marked ``sending`` in one transaction
ACK_BATCH = 64  # outcomes recorded in one transaction


# --- one event ---------------------------------------------------------------------------------


#: How one event's delivery ends (an OutboxStatus, or its plain value).
Delivered = Union[Literal[OutboxStatus.ACKED, OutboxStatus.DEAD], Literal["acked", "dead"]]


@dataclass(frozen=True)
class Delivery:
    """How one event's delivery ended: ``acked`` (the API holds it) or ``dead`` (refused)."""

    status: Delivered
    event_id: Optional[str]
    error: str = ""
    attempts: int = 0  # POSTs made in this call
    found_by_lookup: bool = False


def _no_op(_attempt: int) -> None:
    return None


def deliver(
    client: AllocationsClient,
    allocation: str,
    body: Mapping[str, Any],
    event_key: str,
    *,
    outcome_unknown_before: bool,
    before_attempt: Callable[[int], None] = _no_op,
) -> Delivery:
    """Post one event exactly once; the caller has recorded it ``sending`` already.

    ``before_attempt(n)`` runs before the n-th POST. When the previous attempt's outcome is
    unknown (or ``outcome_unknown_before``), the key is looked up first and a found event is
    acked without posting. Look-up and POST are retried together with the client's policy
    (attempts, backoff, retry budget). Returns ``dead`` for a permanent refusal of the event.
    Raises :class:`FatalApiError` (stop the sync, the event stays pending) and
    :class:`DeliveryFailed` when attempts or the client's retry budget run out.
    """
    unknown = outcome_unknown_before
    posts = 0

    def attempt() -> Delivery:
        nonlocal unknown, posts
        if unknown:
            found = _look_up(client, allocation, event_key)
            if found is not None:
                event_id = str(found.get("usageEventId") or found.get("id") or "")
                log.info(
                    "event %s acked as %s (found by look-up after an unknown outcome)",
                    event_key,
                    event_id,
                )
                return Delivery(OutboxStatus.ACKED, event_id, attempts=posts, found_by_lookup=True)
        posts += 1
        before_attempt(posts)
        log.debug("event %s: POST attempt %d to %s", event_key, posts, allocation)
        try:
            created = client.post_usage(allocation, body)
        except RequestFailed as exc:
            unknown = exc.outcome_unknown
            raise
        except FatalApiError:
            raise
        except errors.ApiError as exc:
            log.info("event %s dead-lettered: %s", event_key, exc)
            return Delivery(OutboxStatus.DEAD, None, error=str(exc), attempts=posts)
        log.info("event %s acked as %s", event_key, created["id"])
        return Delivery(OutboxStatus.ACKED, str(created["id"]), attempts=posts)

    try:
        return client.with_retries(attempt)
    except RequestFailed as exc:
        outcome = "may have been received" if unknown else "was not received"
        raise DeliveryFailed(
            f"could not deliver event {event_key} to allocation {allocation!r}: {exc} "
            f"({posts} POST attempt{'s' if posts != 1 else ''}; the last one {outcome}; retry "
            f"budget {client.budget.spent_s:.0f} of {client.budget.total_s:.0f} s used); it "
            "stays pending and is sent again by the next sync",
            event_key=event_key,
            last_outcome_unknown=unknown,
            attempts=posts,
        ) from exc


def _look_up(
    client: AllocationsClient, allocation: str, event_key: str
) -> Optional[dict[str, Any]]:
    """The event ``event_key`` on the API, or None; a refused look-up stops the sync."""
    try:
        return client.lookup_usage(allocation, event_key)
    except FatalApiError:
        raise
    except errors.ApiError as exc:
        raise FatalApiError(
            exc.status,
            f"looking up event {event_key} (outcome of an earlier send unknown) "
            f"failed: {exc.message}",
            exc.code,
        ) from exc


# --- the outbox --------------------------------------------------------------------------------


class _Workers:
    """At most ``count`` threads running the jobs submitted, in order, each job in one thread.

    What ``ThreadPoolExecutor`` did here, without its futures, which nobody read (a job hands
    its result over itself): their locks and conditions for every event cost about a tenth of
    the delivery rate at 0 ms of latency. ``shutdown`` lets the jobs already submitted run (a
    pass that stops makes them return at once), then waits for the threads to end.
    """

    def __init__(self, count: int) -> None:
        self._count = count
        self._jobs: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, job: Callable[[], None]) -> None:
        if len(self._threads) < self._count:
            thread = threading.Thread(
                target=self._serve, name=f"slurm-tracker-delivery-{len(self._threads)}"
            )
            thread.start()
            self._threads.append(thread)
        self._jobs.put(job)

    def _serve(self) -> None:
        for job in iter(self._jobs.get, None):
            job()

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


@dataclass(frozen=True)
class DeliveryReport:
    """What one delivery pass did with the outbox."""

    acked: int = 0
    found_by_lookup: int = 0
    dead: int = 0
    pending: int = 0
    unavailable: str = ""  # the last "API unavailable" message, if any
    auth_error: str = ""


@dataclass(frozen=True)
class _Result:
    """What a worker did with one row."""

    row: state.OutboxRow
    kind: Union[Delivered, Literal["failed", "refused", "unsent", "error"]]
    delivery: Optional[Delivery] = None
    message: str = ""
    outcome_unknown: bool = False
    posts: int = 0
    error: Optional[BaseException] = None


class _Pass:
    """One delivery pass: the dispatcher (the caller's thread) and its bookkeeping."""

    def __init__(
        self,
        store: state.State,
        client: AllocationsClient,
        clock: Callable[[], datetime],
        concurrency: int,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.concurrency = max(1, concurrency)
        self.stop = threading.Event()
        self.results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self.writes: list[state.OutboxUpdate] = []
        self.counts = {"acked": 0, "found": 0, "dead": 0, "pending": 0, "failed_in_a_row": 0}
        self.unavailable = ""
        self.auth_error = ""
        self.in_flight = 0
        self.failure: Optional[BaseException] = None
        self.dead: Counter[tuple[str, str]] = Counter()  # per (allocation, SKU)
        self.first_dead = ""

    # -- workers (any thread): never raise, never touch the state file

    def work(self, row: state.OutboxRow) -> None:
        self.results.put(self.send(row))

    def send(self, row: state.OutboxRow) -> _Result:
        if self.stop.is_set():
            return _Result(row, "unsent")
        try:
            outcome = deliver(
                self.client,
                row.allocation,
                row.body,
                row.event_key,
                outcome_unknown_before=row.needs_lookup,
            )
        except DeliveryFailed as exc:
            return _Result(
                row, "failed", None, str(exc), exc.last_outcome_unknown, posts=exc.attempts
            )
        except errors.ApiError as exc:  # the key or the configuration was refused (401, 403...)
            self.stop.set()  # every other event would fail the same way
            return _Result(row, "refused", None, str(exc), True, posts=1)
        except BaseException as exc:  # a bug, or the process is going down: the caller raises
            self.stop.set()
            return _Result(row, "error", error=exc)
        return _Result(row, outcome.status, outcome, posts=outcome.attempts)

    # -- the dispatcher (the caller's thread): the only writer of the state file

    def run(self) -> DeliveryReport:
        pool = _Workers(self.concurrency) if self.concurrency > 1 else None
        try:
            for batch in self.batches():
                if self.stop.is_set():
                    self.counts["pending"] += len(batch)
                    continue
                self.store.mark_sending_many([r.event_key for r in batch], self.clock())
                for number, row in enumerate(batch):
                    if self.stop.is_set():
                        self.unsend(batch[number:])
                        break
                    if pool is None:
                        self.handle(self.send(row))
                        continue
                    while self.in_flight >= 2 * self.concurrency:  # workers never wait for us
                        self.take()
                    pool.submit(functools.partial(self.work, row))
                    self.in_flight += 1
                    self.drain(block=False)
            self.drain(block=True)
            self.flush(everything=True)
        except BaseException:
            self.stop.set()  # rows not yet started are never posted (see send)
            raise
        finally:
            if pool is not None:
                pool.shutdown()
        if self.failure is not None:
            raise self.failure
        if self.dead:
            log.warning(
                "%d events dead-lettered (%s); the first: %s; see `slurm-tracker outbox list "
                "--status dead` (-v: one line per event)",
                sum(self.dead.values()),
                ", ".join(f"{a} {s}: {n}" for (a, s), n in sorted(self.dead.items())),
                self.first_dead,
            )
        return DeliveryReport(
            acked=self.counts["acked"],
            found_by_lookup=self.counts["found"],
            dead=self.counts["dead"],
            pending=self.counts["pending"],
            unavailable=self.unavailable,
            auth_error=self.auth_error,
        )

    def take(self) -> None:
        """Handle the next result of a worker (waiting for it)."""
        result = self.results.get()
        self.in_flight -= 1
        self.handle(result)

    def batches(self) -> Iterator[Sequence[state.OutboxRow]]:
        """The outbox's rows to send, MARK_BATCH at a time, oldest first (never all at once)."""
        position = 0
        while True:
            batch, position = self.store.to_send_from(position, MARK_BATCH)
            if not batch:
                return
            yield batch

    def drain(self, *, block: bool) -> None:
        while self.in_flight and (block or not self.results.empty()):
            self.take()

    def handle(self, result: _Result) -> None:
        """Count one row's outcome and queue its write (flushed every ACK_BATCH rows)."""
        row = result.row
        key = row.event_key
        extra = result.posts - 1  # the mark counted one attempt
        if result.kind == "error":
            # it may have been posted before it failed: it stays ``sending`` (looked up next)
            self.stop.set()
            self.counts["pending"] += 1
            if self.failure is None and result.error is not None:
                self.failure = result.error
            return
        if result.kind == "unsent":
            self.unsend([row])
            return
        if result.kind in (OutboxStatus.ACKED, OutboxStatus.DEAD):
            self.counts["failed_in_a_row"] = 0
        delivery = result.delivery
        if result.kind == OutboxStatus.ACKED and delivery is not None:
            self.counts["acked"] += 1
            self.counts["found"] += int(delivery.found_by_lookup)
            self.write(
                state.OutboxUpdate(
                    key,
                    OutboxStatus.ACKED,
                    event_id=delivery.event_id,
                    extra=extra,
                    found_by_lookup=delivery.found_by_lookup,
                )
            )
        elif result.kind == OutboxStatus.DEAD and delivery is not None:
            log.info("event %s dead-lettered: %s", key, delivery.error)  # summarised: run()
            self.dead[(row.allocation, row.sku)] += 1
            self.first_dead = self.first_dead or f"{key}: {delivery.error}"
            self.counts["dead"] += 1
            self.write(
                state.OutboxUpdate(key, OutboxStatus.DEAD, error=delivery.error, extra=extra)
            )
        else:  # failed (API unavailable) or refused (stop the pass)
            self.counts["pending"] += 1
            self.write(
                state.OutboxUpdate(
                    key,
                    OutboxStatus.PENDING,
                    error=result.message,
                    outcome_unknown=result.outcome_unknown,
                    extra=extra,
                )
            )
            if result.kind == "refused":
                self.auth_error = result.message
                self.stop.set()
            else:
                self.unavailable = result.message
                self.counts["failed_in_a_row"] += 1
                if self.counts["failed_in_a_row"] >= GIVE_UP_AFTER_FAILURES:
                    self.stop.set()  # the API is down: leave the rest for the next sync

    def unsend(self, rows: Sequence[state.OutboxRow]) -> None:
        """Rows marked ``sending`` by this pass and never posted: back to pending, with the
        look-up they needed before (a lost write leaves them ``sending``: looked up, harmless)."""
        for row in rows:
            self.counts["pending"] += 1
            self.write(
                state.OutboxUpdate(
                    row.event_key, OutboxStatus.PENDING, outcome_unknown=row.needs_lookup, extra=-1
                )
            )

    def write(self, update: state.OutboxUpdate) -> None:
        self.writes.append(update)
        self.flush(everything=False)

    def flush(self, *, everything: bool) -> None:
        while self.writes and (everything or len(self.writes) >= ACK_BATCH):
            batch, self.writes = self.writes[:ACK_BATCH], self.writes[ACK_BATCH:]
            self.store.record_outcomes(batch, self.clock())


def deliver_outbox(
    store: state.State,
    client: AllocationsClient,
    clock: Callable[[], datetime],
    concurrency: int = 1,
) -> DeliveryReport:
    """Send every pending event, at most ``concurrency`` at a time; never lose one.

    See the module's docstring for the protocol. A rejected API key stops the pass (every
    other event would fail the same way), and so do GIVE_UP_AFTER_FAILURES events in a row that
    could not be delivered: an unreachable API must not hold one sync for hours, while one
    event the API keeps failing on blocks no other. A state file that cannot record outcomes
    (StateError, StateUnavailable) stops the pass and is raised: every event keeps its stored
    status, and the next run goes on from there.
    """
    return _Pass(store, client, clock, concurrency).run()


__all__ = [
    "ACK_BATCH",
    "GIVE_UP_AFTER_FAILURES",
    "MARK_BATCH",
    "Delivery",
    "DeliveryReport",
    "deliver",
    "deliver_outbox",
]
