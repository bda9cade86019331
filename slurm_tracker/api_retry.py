"""The retry policy of the API client: attempts, backoff and the retry budget of a sync.

Part of the API client (:mod:`slurm_tracker.api` re-exports :class:`RetryBudget`). An
operation that raises :class:`~slurm_tracker.api_outcomes.RequestFailed` is run again, at most
``max_attempts`` times in all, after a full-jitter exponential backoff or the server's
``Retry-After``; every wait and every failed attempt's time is spent from one
:class:`RetryBudget`, shared by all the requests of a client, and a retry whose wait the budget
cannot pay is not made (the last failure is raised). Anything else the operation raises or
returns ends it at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

import tenacity

from slurm_tracker.api_outcomes import RequestFailed

log = logging.getLogger("slurm_tracker.api")  # the name the client's logs have always carried

_T = TypeVar("_T")


class RetryBudget:
    """Seconds one sync may spend on failed attempts and the waits between retries, shared by
    every request of a client (and every thread using it)."""

    def __init__(self, total_s: float) -> None:
        self.total_s = float(total_s)
        self._spent_s = 0.0
        self._lock = threading.Lock()

    @property
    def spent_s(self) -> float:
        with self._lock:
            return self._spent_s

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._spent_s += max(0.0, seconds)

    def allows(self, seconds: float) -> bool:
        with self._lock:
            return self._spent_s + seconds <= self.total_s


class _RetryPlan:
    """Stop and wait policies of one retried operation, for tenacity.

    The wait after attempt n is computed once (full jitter, or the server's Retry-After) and
    used by both the stop test (does the budget allow it?) and the wait itself, whatever order
    the installed tenacity calls them in.
    """

    def __init__(
        self,
        max_attempts: int,
        budget: RetryBudget,
        backoff_base_s: float,
        backoff_max_s: float,
        sleep: Callable[[float], None],
    ) -> None:
        self._max_attempts = max_attempts
        self._budget = budget
        self._sleep = sleep
        self._waits: dict[int, float] = {}
        self._jitter = tenacity.wait_random_exponential(
            multiplier=backoff_base_s, max=backoff_max_s
        )

    def wait_for(self, state: tenacity.RetryCallState) -> float:
        number = state.attempt_number
        if number not in self._waits:
            exc = state.outcome.exception() if state.outcome is not None else None
            retry_after = getattr(exc, "retry_after_s", None)
            if isinstance(retry_after, (int, float)):
                self._waits[number] = float(retry_after)
            else:
                self._waits[number] = float(self._jitter(state))
        return self._waits[number]

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self._max_attempts:
            return True
        return not self._budget.allows(self.wait_for(state))

    def sleep_in_budget(self, seconds: float) -> None:
        self._budget.spend(seconds)
        self._sleep(seconds)

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RequestFailed),
            stop=self.stop,
            wait=self.wait_for,
            sleep=self.sleep_in_budget,
            before_sleep=_log_retry,
            reraise=True,
        )


def run_with_retries(
    operation: Callable[[], _T],
    *,
    max_attempts: int,
    budget: RetryBudget,
    backoff_base_s: float,
    backoff_max_s: float,
    sleep: Callable[[float], None],
) -> _T:
    """``operation()``, run again after each :class:`RequestFailed` it raises (see the module's
    docstring); ``sleep`` waits between attempts (the budget is spent here).

    The first attempt is made directly: most succeed, and setting tenacity's machinery up for
    each of them cost 7 us of CPU per call. After a first failure, tenacity takes over from
    attempt 1 (given that failure), so every stop, wait, log and sleep is the one a run of
    tenacity from the start makes.
    """
    try:
        return operation()
    except RequestFailed as exc:
        first: RequestFailed = exc
    replayed = False

    def again() -> _T:
        nonlocal replayed
        if not replayed:
            replayed = True
            raise first
        return operation()

    plan = _RetryPlan(max_attempts, budget, backoff_base_s, backoff_max_s, sleep)
    for attempt in plan.retrying():
        with attempt:
            return again()
    raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.debug("attempt %d failed: %s; retrying in %.1f s", state.attempt_number, exc, wait)


__all__ = ["RetryBudget", "run_with_retries"]
