"""Backfill: load months of history chunk by chunk, resumably, delivering as it goes.

One sacct call per chunk of ``[start, end)``, a pause between calls (slurmdbd is shared).
Each chunk is planned against the state and committed before the next is read, then its
events are delivered, so the outbox never holds more than about one chunk. After each chunk
the state remembers how far the backfill got (``State.set_backfill_done``): a killed or
stopped backfill, run again with the same --start and --chunk, skips the chunks already
committed and goes on with the next one. Re-reading a chunk would bill nothing twice (every
run's progress is in the state); skipping it only spares slurmdbd.

The end of the period is capped at now minus ``sacct.lag``: slurmdbd may not have the last
minutes yet, and the regular sync bills them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

from slurm_tracker import api, ledger, rating, state
from slurm_tracker.config import Config
from slurm_tracker.delivery import DeliveryReport, deliver_outbox
from slurm_tracker.inputs import Input, Window, chunks, parse_input, read_live
from slurm_tracker.models import JobRecord, ParseResult, RunKey
from slurm_tracker.pipeline import (
    SyncResult,
    add_deliveries,
    commit,
    compare_with_api,
    deliver_and_finish,
    utc_now,
    without_events,
)
from slurm_tracker.planning import plan_usage
from slurm_tracker.plans import Plan, merge_plans, reported_after
from slurm_tracker.times import utc_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a backfill, done: shown as progress."""

    number: int  # 1-based
    total: int
    window: Window
    records: int = 0
    events: int = 0
    resumed: bool = False  # committed by an earlier backfill that was stopped: not read again


Progress = Callable[[Chunk], None]


def _quiet(_chunk: Chunk) -> None:
    return None


@dataclass(frozen=True)
class Period:
    """What to backfill: [start_at, end_at) in chunks of ``chunk_s`` seconds."""

    start_at: datetime
    end_at: datetime
    chunk_s: int

    def windows(self) -> list[Window]:
        """The chunks (the last may be shorter)."""
        return chunks(self.start_at, self.end_at, self.chunk_s)


def capped_end(end_at: datetime, now_at: datetime, lag_s: int) -> datetime:
    """``end_at``, but never after now minus the lag (slurmdbd may not have it yet)."""
    return min(end_at, now_at - timedelta(seconds=lag_s))


def in_period(parsed: ParseResult, window: Window) -> ParseResult:
    """The records of a saved file that ran in ``window`` (as sacct -S/-E would select)."""

    def ran_in(record: JobRecord) -> bool:
        began = record.start_at or record.submit_at
        return began < window.end_at and (record.end_at is None or record.end_at >= window.start_at)

    kept = tuple(r for r in parsed.records if ran_in(r))
    return ParseResult(kept, parsed.rejected, parsed.steps_ignored)


def _records(
    config: Config,
    window: Window,
    environ: Mapping[str, str],
    saved: Optional[Input],
) -> ParseResult:
    if saved is not None:
        return in_period(parse_input(config, saved, None), window)
    return parse_input(config, read_live(config, window, environ), None)


def preview(
    config: Config,
    store: state.State,
    catalog: Optional[rating.Catalog],
    period: Period,
    environ: Mapping[str, str],
    *,
    saved: Optional[Input] = None,
    progress: Progress = _quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Plan]:
    """A dry backfill: the plan of every chunk, as if the ones before it had been stored.

    Chunk by chunk, as they are read (consume them while ``store`` is open): what is shown is
    never held for the whole period. Only what each run was planned up to is remembered from
    one chunk to the next (a run spanning chunks is read by each), and a final run is forgotten
    a chunk after the one it ended in (no later window can return it)."""
    windows = [Window(period.start_at, period.end_at)] if saved else period.windows()
    reported: dict[RunKey, int] = {}
    ended_at: dict[RunKey, datetime] = {}  # the end of each final run in ``reported``
    forgotten_before = store.pruned_before()
    for number, window in enumerate(windows, 1):
        if number > 1:
            sleep(config.sacct.backfill_pause_s)
        parsed = _records(config, window, environ, saved)
        runs = {r.run for r in parsed.records}
        known = {**store.reported(runs), **{r: s for r, s in reported.items() if r in runs}}
        plan = plan_usage(
            parsed,
            known,
            config,
            catalog,
            now_at=utc_now(),
            forgotten_before=forgotten_before,
            agent=ledger.agent_id(store.path),
        )
        reported.update(reported_after(plan, known))
        ended_at.update((r.run, r.end_at) for r in parsed.records if r.end_at is not None)
        for run in [r for r, end in ended_at.items() if end < window.start_at]:
            # ended before this window: the next one (from this one's end) cannot return it
            del ended_at[run]
            reported.pop(run, None)
        progress(Chunk(number, len(windows), window, plan.records, len(plan.events)))
        yield plan


def run(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    catalog: Optional[rating.Catalog],
    period: Period,
    environ: Mapping[str, str],
    *,
    saved: Optional[Input] = None,
    progress: Progress = _quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncResult:
    """Load history: each chunk read, committed, remembered and delivered before the next.

    The caller holds the lock. Stops early (resumable) when the API is unavailable or
    refuses the key: planning more would only grow the outbox.
    """
    started_at = utc_now()
    windows = [Window(period.start_at, period.end_at)] if saved else period.windows()
    if not windows:
        return deliver_and_finish(
            config, store, client, merge_plans([]), None, 0, started_at, kind="backfill"
        )
    done_through = None if saved else store.backfill_done_through(period.start_at, period.chunk_s)
    if done_through is not None:
        log.warning(
            "resuming the backfill from %s: the chunks before were committed by an earlier "
            "backfill that was stopped",
            utc_text(done_through),
        )
    agent = ledger.agent_id(store.path)
    compare_with_api(
        config, store, client, period.start_at - timedelta(seconds=ledger.LEARN_BEFORE_S)
    )
    plans: list[Plan] = []
    new = 0
    delivered = DeliveryReport()
    read = 0
    stopped = False
    for number, window in enumerate(windows, 1):
        if done_through is not None and window.end_at <= done_through:
            progress(Chunk(number, len(windows), window, resumed=True))
            continue
        if read:
            sleep(config.sacct.backfill_pause_s)
        read += 1
        parsed = _records(config, window, environ, saved)
        plan = plan_usage(
            parsed,
            store.reported(r.run for r in parsed.records),
            config,
            catalog,
            now_at=utc_now(),
            forgotten_before=store.pruned_before(),
            agent=agent,
        )
        new += commit(store, plan, utc_now(), None)
        plans.append(without_events(plan))  # committed: keep the counts, not the events
        if saved is None:
            store.set_backfill_done(period.start_at, period.chunk_s, window.end_at)
        sent = deliver_outbox(store, client, utc_now, config.api.concurrency)
        delivered = add_deliveries(delivered, sent)
        progress(Chunk(number, len(windows), window, plan.records, len(plan.events)))
        if (sent.auth_error or sent.unavailable) and number < len(windows):
            stopped = True
            log.warning(
                "backfill stopped after chunk %d/%d (%s): run the same command again to go on "
                "from chunk %d",
                number,
                len(windows),
                sent.auth_error or sent.unavailable,
                number + 1,
            )
            break
    if not stopped and saved is None:
        store.set_backfill_done(period.start_at, period.chunk_s, None)
    whole = Window(windows[0].start_at, windows[-1].end_at)
    return deliver_and_finish(
        config,
        store,
        client,
        merge_plans(plans),
        whole,
        new,
        started_at,
        kind="backfill",
        delivered_before=delivered,
    )


class Eta:
    """Progress lines for a backfill: ``backfill chunk 3/12 [...): 812 records, 1490 events;
    ETA 4 min`` (the ETA from the chunks read so far; resumed chunks take no time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.read = 0

    def line(self, chunk: Chunk) -> str:
        start, end = utc_text(chunk.window.start_at), utc_text(chunk.window.end_at)
        if chunk.resumed:
            return (
                f"backfill chunk {chunk.number}/{chunk.total} [{start}, {end}): committed by an "
                "earlier backfill, not read again"
            )
        self.read += 1
        left = chunk.total - chunk.number
        eta = ""
        if left:
            eta = f"; ETA {_duration((self.clock() - self.started) / self.read * left)}"
        return (
            f"backfill chunk {chunk.number}/{chunk.total} [{start}, {end}): {chunk.records} "
            f"records, {chunk.events} events{eta}"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
