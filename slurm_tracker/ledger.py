"""What the Allocations API holds: the record of what was billed.

Every event the agent posts carries its key (``st1:<cluster>:<jobidraw>:<submit>:<from>-<to>:
<sku>``, see events.event_key) and the identity of the agent that planned it (``agent``) in its
metadata. This module reads them back: which stretches of which runs are already billed, by
whom. The local state is a cache of this; when it is lost, restored from an old backup or
written by a second agent, the API says what really happened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Optional, Protocol

from slurm_tracker.errors import ApiError, TemporaryFailure, WriterConflict
from slurm_tracker.events import KEY_VERSION
from slurm_tracker.state import AdoptedEvent, State
from slurm_tracker.times import utc_text

log = logging.getLogger(__name__)

#: ``st1:<cluster>:<jobidraw>:<submit epoch>:<from_s>-<to_s>:<sku>``. The cluster name has no
#: ':' (the config refuses one); JobIDRaw is digits (with ``+``/``_`` forms accepted); the SKU
#: code is the rest.
_KEY_RE = re.compile(
    rf"{KEY_VERSION}:(?P<cluster>[^:]+):(?P<job>[^:]+):(?P<submit>[0-9]+):"
    r"(?P<from>[0-9]+)-(?P<to>[0-9]+):(?P<sku>.+)"
)


@dataclass(frozen=True)
class KeyParts:
    """An event key taken apart."""

    cluster: str
    job_id_raw: str
    submit_epoch: int
    from_s: int
    to_s: int
    sku: str

    @property
    def run(self) -> str:
        """The run's identity text, as models.RunKey.text writes it."""
        return f"{self.cluster}:{self.job_id_raw}:{self.submit_epoch}"


def parse_event_key(key: str) -> Optional[KeyParts]:
    """The parts of one of our event keys, or None for anything else."""
    match = _KEY_RE.fullmatch(key)
    if match is None:
        return None
    from_s, to_s = int(match.group("from")), int(match.group("to"))
    if to_s <= from_s:
        return None
    return KeyParts(
        cluster=match.group("cluster"),
        job_id_raw=match.group("job"),
        submit_epoch=int(match.group("submit")),
        from_s=from_s,
        to_s=to_s,
        sku=match.group("sku"),
    )


def key_prefix(cluster: str) -> str:
    """What every key of ``cluster`` starts with (the list endpoint's metadata filter)."""
    return f"{KEY_VERSION}:{cluster}:"


@dataclass(frozen=True)
class BilledEvent:
    """One of our events as the API holds it."""

    cost_id: str  # the list item's id: what the delete endpoint takes
    allocation: str
    key: str
    parts: KeyParts
    quantity: Decimal
    started_at: Optional[datetime]
    ended_at: Optional[datetime]
    created_at: Optional[datetime]
    agent: str  # "" for events posted before agents named themselves

    @property
    def run(self) -> str:
        return self.parts.run


def _time(value: Any) -> Optional[datetime]:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def billed_event(item: Mapping[str, Any], allocation: str, cluster: str) -> Optional[BilledEvent]:
    """The BilledEvent of a list item, or None when it is not one of ours for ``cluster``."""
    meta = item.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    key = meta.get("eventKey")
    parts = parse_event_key(key) if isinstance(key, str) else None
    if parts is None or parts.cluster != cluster:
        return None
    try:
        quantity = Decimal(str(item.get("quantity")))
    except (InvalidOperation, ValueError):
        return None
    if not quantity.is_finite():
        return None
    agent = meta.get("agent")
    return BilledEvent(
        cost_id=str(item.get("id") or ""),
        allocation=allocation,
        key=str(key),
        parts=parts,
        quantity=quantity,
        started_at=_time(item.get("startedAt")),
        ended_at=_time(item.get("endedAt")),
        created_at=_time(item.get("createdAt")),
        agent=agent if isinstance(agent, str) else "",
    )


class UsageLister(Protocol):
    """The part of api.AllocationsClient this module needs."""

    def iter_usage(
        self,
        allocation: str,
        *,
        metadata: Optional[str] = None,
        started_from: Optional[datetime] = None,
        started_to: Optional[datetime] = None,
        ended_from: Optional[datetime] = None,
        ended_to: Optional[datetime] = None,
        created_from: Optional[datetime] = None,
        created_to: Optional[datetime] = None,
    ) -> Iterator[dict[str, Any]]: ...


def billed_events(
    client: UsageLister,
    allocations: Iterable[str],
    cluster: str,
    *,
    ended_from: Optional[datetime] = None,
    ended_to: Optional[datetime] = None,
    created_from: Optional[datetime] = None,
) -> list[BilledEvent]:
    """Our events of ``cluster`` on ``allocations`` (optionally by end or creation time)."""
    found: list[BilledEvent] = []
    for allocation in allocations:
        for item in client.iter_usage(
            allocation,
            metadata=key_prefix(cluster),
            ended_from=ended_from,
            ended_to=ended_to,
            created_from=created_from,
        ):
            event = billed_event(item, allocation, cluster)
            if event is not None:
                found.append(event)
    return found


def billed_seconds(events: Sequence[BilledEvent]) -> dict[str, int]:
    """Per run, how many elapsed seconds the API holds as billed: the end of the furthest
    stretch. (Gaps and overlaps are reconcile's business; for planning, nothing at or before
    this is billed again.)"""
    seconds: dict[str, int] = {}
    for event in events:
        run = event.run
        seconds[run] = max(seconds.get(run, 0), event.parts.to_s)
    return seconds


# --- bringing the state file in line with the API ---------------------------------------------

#: Events created this long before the last check are read again (clocks, posts in flight).
CHECK_MARGIN_S = 600
#: A new state file learns the events that ended this long before its first window.
LEARN_BEFORE_S = 86400


def agent_id(state_path: Path) -> str:
    """``<host>/<10 hex of the state file's real path>``: who billed an event.

    The same state file on the same host is the same agent, even after the file was lost and
    made anew, or restored from a backup; a second state file, or another host, is another
    agent.
    """
    digest = hashlib.sha256(os.path.realpath(state_path).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}/{digest}"


@dataclass(frozen=True)
class Check:
    """What comparing the API's events with the state file found."""

    read: int = 0  # our cluster's events read
    adopted: int = 0  # events the state did not know, now counted as billed
    taken_over: tuple[str, ...] = ()  # other agents whose events were adopted (--take-over)
    skipped: str = ""  # why the comparison could not be made this time


def _adopted(event: BilledEvent) -> Optional[AdoptedEvent]:
    if event.started_at is None or event.ended_at is None:
        return None
    return AdoptedEvent(
        key=event.key,
        allocation=event.allocation,
        sku=event.parts.sku,
        quantity=event.quantity,
        run=event.run,
        to_s=event.parts.to_s,
        started_at=event.started_at,
        ended_at=event.ended_at,
        event_id=event.cost_id,
    )


def check(
    store: State,
    client: UsageLister,
    allocations: Sequence[str],
    cluster: str,
    agent: str,
    *,
    now_at: datetime,
    learn_from: datetime,
    take_over: bool = False,
    relearn: bool = False,
) -> Check:
    """Compare the API's events of ``cluster`` with the state file before planning.

    A state file that never did this (new, or lost and made anew) reads the events that ended
    since ``learn_from``; an existing one reads those created since its last check. Events it
    does not know are *adopted* (counted as billed, so nothing is billed twice) when they are
    its own agent's or carry no agent (older versions): a restored old backup or a lost file
    catches up this way. Events of another agent raise WriterConflict unless ``take_over``:
    two agents on one cluster would bill every job twice.

    An existing state file goes on when the API cannot be read (the check is skipped and says
    why); a new one cannot (TemporaryFailure): it would bill again what is already billed.
    ``relearn`` (`state rebuild --from-api`) reads from ``learn_from`` whatever the file knows.
    """
    since = None if relearn else store.ledger_checked_at()
    events: list[BilledEvent] = []
    for allocation in allocations:
        try:
            if since is None:
                events += billed_events(client, [allocation], cluster, ended_from=learn_from)
            else:
                margin = timedelta(seconds=CHECK_MARGIN_S)
                events += billed_events(client, [allocation], cluster, created_from=since - margin)
        except ApiError as exc:
            log.warning("cannot read the events of allocation %r: %s", allocation, exc)
        except TemporaryFailure as exc:
            if since is None:
                raise TemporaryFailure(
                    f"this state file is new: it must first learn from the API what is already "
                    f"billed, and the API cannot be read ({exc}); nothing was planned"
                ) from exc
            log.warning("the API's record was not compared this time: %s", exc)
            return Check(skipped=str(exc))
    known = store.known_keys(e.key for e in events)
    unknown = [e for e in events if e.key not in known]
    others = sorted({e.agent for e in unknown if e.agent and e.agent != agent})
    if others and not take_over:
        theirs = [e for e in unknown if e.agent in others]
        latest = max((e.created_at for e in theirs if e.created_at), default=None)
        when = f", the latest created {utc_text(latest)}" if latest else ""
        raise WriterConflict(
            f"another slurm-tracker bills cluster {cluster}: {len(theirs)} event(s) from "
            f"{', '.join(others)}{when} (this one is {agent}). Two agents would bill every job "
            "twice, so this sync stopped and posted nothing. Run one agent per cluster: stop "
            "the other one (another host, or another state file on this host); if it is "
            "stopped for good and this one replaces it, run `slurm-tracker sync --take-over` "
            "once (its events are then counted as billed)"
        )
    adoptable = [a for a in (_adopted(e) for e in unknown) if a is not None]
    adopted = store.adopt(adoptable, now_at, checked_at=now_at)
    if adopted:
        log.warning(
            "%d event(s) on the API were unknown to the state file %s (lost, replaced or "
            "restored from a backup?): counted as billed, nothing is billed twice",
            adopted,
            store.path,
        )
    return Check(read=len(events), adopted=adopted, taken_over=tuple(others))


# --- the older Go agent's events (slurm-tracker migrate, issue 13) ----------------------------

#: The list filter that finds the Go agent's events (its metadata names the job ``jobId``; ours
#: do too, and are told apart by their key).
LEGACY_FILTER = "jobId"


@dataclass(frozen=True)
class LegacyEvent:
    """An event of the older Go agent (parallelworks/slurm-tracker): core-hours of one job,
    with metadata ``jobId`` (its JobIDRaw, a number), ``user``, ``partition``, ``cluster``,
    ``account``, ``qos`` and no key of ours. It billed elapsed seconds
    ``[startedAt - Start, endedAt - Start)`` of the run (it dated them so)."""

    cost_id: str
    allocation: str
    cluster: str
    job_id_raw: str
    quantity: Decimal
    started_at: Optional[datetime]
    ended_at: Optional[datetime]
    created_at: Optional[datetime]


def legacy_event(
    item: Mapping[str, Any], allocation: str, clusters: Sequence[str]
) -> Optional[LegacyEvent]:
    """The LegacyEvent of a list item, or None when it is not the Go agent's for ``clusters``
    (ours carry ``eventKey`` and ``agent``; anything else is not recognised)."""
    meta = item.get("metadata")
    if not isinstance(meta, Mapping) or "eventKey" in meta or "agent" in meta:
        return None
    job = meta.get("jobId")
    if isinstance(job, bool) or not isinstance(job, (int, str)):
        return None
    job_text = str(job)
    if not job_text.isdigit() or job_text.startswith("0"):
        return None
    cluster = meta.get("cluster")
    if not isinstance(cluster, str) or cluster not in clusters:
        return None
    try:
        quantity = Decimal(str(item.get("quantity")))
    except (InvalidOperation, ValueError):
        return None
    if not quantity.is_finite():
        return None
    return LegacyEvent(
        cost_id=str(item.get("id") or ""),
        allocation=allocation,
        cluster=cluster,
        job_id_raw=job_text,
        quantity=quantity,
        started_at=_time(item.get("startedAt")),
        ended_at=_time(item.get("endedAt")),
        created_at=_time(item.get("createdAt")),
    )


def legacy_events(
    client: UsageLister,
    allocations: Iterable[str],
    clusters: Sequence[str],
    *,
    ended_from: Optional[datetime] = None,
) -> list[LegacyEvent]:
    """The Go agent's events of ``clusters`` on ``allocations`` (each once)."""
    found: dict[tuple[str, str], LegacyEvent] = {}
    unnamed: list[LegacyEvent] = []
    for allocation in allocations:
        for item in client.iter_usage(allocation, metadata=LEGACY_FILTER, ended_from=ended_from):
            event = legacy_event(item, allocation, clusters)
            if event is None:
                continue
            if event.cost_id:
                found[(allocation, event.cost_id)] = event
            else:
                unnamed.append(event)
    return [*found.values(), *unnamed]
