"""The steps that deal with the API's record outside a sync's delivery: comparing it with the
state before planning (ledger.check for this agent), and posting repair or correction events
through the outbox with the exactly-once protocol. (Part of the orchestration,
:mod:`slurm_tracker.pipeline`, which re-exports these names; used by syncs, backfills,
reconcile and corrections.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from slurm_tracker import api, ledger, state
from slurm_tracker.catalog_admin import mapped_allocations
from slurm_tracker.committing import commit
from slurm_tracker.config import Config
from slurm_tracker.delivery import DeliveryReport, deliver_outbox
from slurm_tracker.models import PlannedEvent
from slurm_tracker.plans import Plan
from slurm_tracker.windows import Clock, utc_now

__all__ = ["compare_with_api", "post_through_outbox"]

log = logging.getLogger(__name__)


def post_through_outbox(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    events: Sequence[PlannedEvent],
    clock: Clock = utc_now,
) -> tuple[int, DeliveryReport]:
    """Post repair or correction events the way a sync posts its own: committed to the
    outbox first (events above limits.hold_above held), then delivered with the exactly-once
    protocol. Each one is logged. Returns (events new to the outbox, the delivery report)."""
    for event in events:
        log.info(
            "posting event %s to allocation %s: %s %s",
            event.event_key,
            event.allocation,
            event.quantity,
            event.sku,
        )
    limit = config.limits.hold_above
    held = frozenset(e.event_key for e in events if limit and e.quantity > limit)
    plan = Plan(events=tuple(events), skipped=(), rejected=(), held=held)
    new = commit(store, plan, clock(), None, clock=clock)
    return new, deliver_outbox(store, client, clock, config.api.concurrency)


def compare_with_api(
    config: Config,
    store: state.State,
    client: api.AllocationsClient,
    learn_from: datetime,
    *,
    take_over: bool = False,
    relearn: bool = False,
    clock: Clock = utc_now,
) -> ledger.Check:
    """ledger.check for this agent (its state file), cluster and mapped allocations."""
    return ledger.check(
        store,
        client,
        mapped_allocations(config),
        config.cluster,
        ledger.agent_id(store.path),
        now_at=clock(),
        learn_from=learn_from,
        take_over=take_over,
        relearn=relearn,
    )
