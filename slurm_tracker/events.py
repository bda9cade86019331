"""Plan stage: usage segments of a mapped run -> usage events with deterministic keys.

The event key names the run (cluster, JobIDRaw, Submit), the stretch of elapsed seconds it
bills and the SKU, so that planning the same usage twice gives the same key, and the key can
be looked up on the API (list filter on metadata) when a send's outcome is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Union

from slurm_tracker.config import METADATA_FIELDS
from slurm_tracker.models import PlannedEvent, SkuCharge, UsageSegment

KEY_VERSION = "st1"
QUANTUM = Decimal("0.000001")  # quantities are sent with 6 decimals
SECONDS_PER_HOUR = Decimal(3600)


def event_key(segment: UsageSegment, sku: str) -> str:
    """``st1:<cluster>:<jobidraw>:<submit epoch>:<from_s>-<to_s>:<sku>``."""
    return f"{KEY_VERSION}:{segment.record.run.text}:{segment.from_s}-{segment.to_s}:{sku}"


def quantity(segment: UsageSegment, charge: SkuCharge) -> Decimal:
    """The metric's count x the segment's seconds / 3600, rounded half-even to 6 decimals."""
    exact = segment.record.tres.count(charge.metric) * segment.seconds / SECONDS_PER_HOUR
    return exact.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


def job_metadata(segment: UsageSegment, fields: Sequence[str]) -> dict[str, Union[str, int]]:
    """Metadata that identifies the job run, plus the job fields the config asks for."""
    record = segment.record
    meta: dict[str, Union[str, int]] = {
        "cluster": record.cluster,
        "jobId": record.job_id,
        "jobIdRaw": record.job_id_raw,
        "submittedAt": rfc3339(record.submit_at),
        "account": record.account,
        "partition": record.partition,
        "elapsedFrom": segment.from_s,
        "elapsedTo": segment.to_s,
    }
    for name in fields:
        if name == "job_name":
            meta["jobName"] = record.job_name
        else:
            value = record.extra.get(METADATA_FIELDS[name], "")
            if value:
                meta[_camel(name)] = value
    return meta


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def plan(
    segments: Sequence[UsageSegment],
    allocation: str,
    charges: Sequence[SkuCharge],
    metadata_fields: Sequence[str] = (),
    agent: str = "",
) -> list[PlannedEvent]:
    """One event per segment and SKU; charges whose metric the run does not hold give none.

    ``agent`` (pipeline.agent_id) names the agent in the metadata, so that the API's record
    says who billed what (a second agent on the same cluster is noticed)."""
    events: list[PlannedEvent] = []
    for segment in segments:
        base_meta = job_metadata(segment, metadata_fields)
        if agent:
            base_meta["agent"] = agent
        for charge in charges:
            amount = quantity(segment, charge)
            if amount <= 0:
                continue
            key = event_key(segment, charge.sku)
            meta: Mapping[str, Union[str, int]] = {
                "eventKey": key,
                **base_meta,
                "metric": charge.metric,
            }
            events.append(
                PlannedEvent(
                    event_key=key,
                    allocation=allocation,
                    sku=charge.sku,
                    metric=charge.metric,
                    quantity=amount,
                    started_at=segment.started_at,
                    ended_at=segment.ended_at,
                    user=segment.record.user,
                    metadata=meta,
                    run=segment.record.run,
                    to_s=segment.to_s,
                    final=segment.record.final and segment.to_s == segment.record.elapsed_s,
                )
            )
    return events


def request_body(event: PlannedEvent) -> dict[str, object]:
    """The ``PostUsageEventInput`` body of an event (see the API contract)."""
    body: dict[str, object] = {
        "sku": event.sku,
        "quantity": float(event.quantity),
        "startedAt": rfc3339(event.started_at),
        "endedAt": rfc3339(event.ended_at),
        "metadata": dict(event.metadata),
    }
    if event.user:
        body["user"] = event.user
    return body


def rfc3339(value: datetime) -> str:
    """``2026-01-31T23:59:59Z``: UTC, whole seconds."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
