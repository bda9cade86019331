"""The window a sync reads, and the clock: from the high-water mark (minus the overlap) to now
(minus the lag), never before the billing floor; a mark in the future is refused.

The clock is passed in: a function here that reads the time takes ``clock`` (the real one,
:func:`utc_now`, by default), so a test can pin it. (Part of the orchestration,
:mod:`slurm_tracker.pipeline`, which re-exports these names.)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Optional

from slurm_tracker import state
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.errors import StateError
from slurm_tracker.inputs import Window
from slurm_tracker.times import utc_text

__all__ = ["Clock", "billing_floor", "check_mark", "sync_window", "utc_now"]

#: A clock: returns the current time, aware, in UTC.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def sync_window(
    now_at: datetime,
    high_water_at: Optional[datetime],
    cfg: SacctConfig,
    floor_at: Optional[datetime] = None,
) -> Window:
    """From the high-water mark minus the overlap (or the first-sync start) to now minus the lag,
    never starting before the billing floor."""
    end_at = now_at - timedelta(seconds=cfg.lag_s)
    if high_water_at is not None:
        start_at = high_water_at - timedelta(seconds=cfg.overlap_s)
    elif cfg.first_sync_start is not None:
        start_at = cfg.first_sync_start
    else:
        start_at = end_at - timedelta(seconds=cfg.first_sync_lookback_s)
    if floor_at is not None:
        start_at = max(start_at, floor_at)
    return Window(start_at, max(start_at, end_at))


def billing_floor(store: state.State, config: Config) -> Optional[datetime]:
    """No usage before this is billed by a sync: the later of the first sync's window start
    (stored by that sync) and an absolute sacct.first_sync_start."""
    floors = [at for at in (store.floor_at(), config.sacct.first_sync_start) if at is not None]
    return max(floors) if floors else None


def check_mark(store: state.State, config: Config, *, clock: Clock = utc_now) -> Optional[datetime]:
    """The high-water mark; StateError when it is in the future of the real clock."""
    mark = store.high_water_at()
    now_at = clock()
    if mark is not None and mark > now_at + timedelta(seconds=config.limits.clock_skew_s):
        raise StateError(
            f"the high-water mark of {store.path} is {utc_text(mark)}, in the future "
            f"(now {utc_text(now_at)}): every sync would read an empty window and bill "
            "nothing. Check the clock, then set the mark back to the last good sync, e.g. "
            f"`slurm-tracker state set-mark {utc_text(now_at - timedelta(hours=1))}` "
            "(usage already billed is not billed again)"
        )
    return mark
