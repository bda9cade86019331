"""``outbox replan``: dead events mapped again with the current configuration.

A dead event was refused by the API (a 4xx such as an unknown allocation: a typo in
``accounts.map``). Its allocation and SKU were frozen when it was planned, so fixing the
configuration and retrying would fail the same way. Replanning maps the event's account and
partition (kept in its metadata) again: same run, same stretch, same quantity, the allocation
and the SKU the configuration gives now. Before anything changes, the event key is looked up
on the API: an event that did land after all is acknowledged, never sent twice.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, Protocol

from slurm_tracker.config import Config
from slurm_tracker.errors import ApiError
from slurm_tracker.mapping import map_record
from slurm_tracker.models import JobRecord, Skipped, Tres
from slurm_tracker.state import OutboxRow, State


class Finder(Protocol):
    def find_usage(self, allocation: str, event_key: str) -> Optional[dict[str, Any]]: ...


@dataclass(frozen=True)
class Replanned:
    key: str
    outcome: str  # "found" (it had landed: acked), "replanned", "unchanged", "refused"
    detail: str = ""


def _mapped(row: OutboxRow, config: Config) -> tuple[Optional[str], Optional[str], str]:
    """(allocation, sku, why not) the current configuration gives the event's run."""
    meta = row.body.get("metadata") if isinstance(row.body, dict) else None
    if not isinstance(meta, dict):
        return None, None, "the stored event has no metadata to map it from"
    account, partition = meta.get("account"), meta.get("partition")
    metric = meta.get("metric")
    if not isinstance(account, str) or not isinstance(partition, str):
        return None, None, "the stored event names no account or partition"
    probe = JobRecord(
        cluster=str(meta.get("cluster", "")),
        job_id=str(meta.get("jobId", "")),
        job_id_raw=str(meta.get("jobIdRaw", "")),
        submit_at=row.started_at,
        start_at=row.started_at,
        end_at=row.ended_at,
        elapsed_s=0,
        state="",
        account=account,
        partition=partition,
        user="",
        tres=Tres(),
    )
    target = map_record(probe, config.accounts, config.partitions)
    if isinstance(target, Skipped):
        return None, None, target.reason
    same_metric = [c for c in target.charges if c.metric == metric]
    if not same_metric:
        return None, None, f"partition {partition!r} no longer charges the metric {metric!r}"
    return target.allocation, same_metric[0].sku, ""


def replan(
    config: Config,
    store: State,
    client: Finder,
    keys: Optional[Sequence[str]],
    now_at: datetime,
) -> list[Replanned]:
    """Replan the dead events named by ``keys`` (every dead one when None)."""
    rows = store.outbox(("dead",))
    if keys is not None:
        wanted = set(keys)
        rows = [r for r in rows if r.event_key in wanted]
    results: list[Replanned] = []
    for row in rows:
        try:
            found = client.find_usage(row.allocation, row.event_key)
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = None  # the allocation does not exist (the typo being fixed): nothing landed
        if found is not None:
            event_id = str(found.get("usageEventId") or found.get("id") or "")
            store.mark_acked(row.event_key, event_id, now_at)
            results.append(Replanned(row.event_key, "found", f"on the API as {event_id}"))
            continue
        allocation, sku, why = _mapped(row, config)
        if allocation is None or sku is None:
            results.append(Replanned(row.event_key, "refused", why))
            continue
        new_key = row.event_key
        if sku != row.sku:
            head, _, _old = row.event_key.rpartition(":")
            new_key = f"{head}:{sku}"
        body = copy.deepcopy(dict(row.body))
        body["sku"] = sku
        body["metadata"] = {**body.get("metadata", {}), "eventKey": new_key}
        if store.replan(row.event_key, allocation, sku, new_key, body, now_at):
            change = f"{row.allocation}/{row.sku} -> {allocation}/{sku}"
            if new_key != row.event_key:
                change += f" (new key {new_key})"
            results.append(Replanned(row.event_key, "replanned", change))
        else:
            results.append(Replanned(row.event_key, "unchanged", "no longer dead"))
    return results
