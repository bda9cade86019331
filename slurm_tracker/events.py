"""Plan stage: usage segments of a mapped run -> usage events with deterministic keys.

The event key names the run (cluster, JobIDRaw, Submit), the stretch of elapsed seconds it
bills and the SKU, so that planning the same usage twice gives the same key, and the key can
be looked up on the API (list filter on metadata) when a send's outcome is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Optional, Union

from slurm_tracker.config import METADATA_FIELDS
from slurm_tracker.models import JobRecord, Metric, PlannedEvent, Rated, SkuCharge, UsageSegment
from slurm_tracker.times import utc_text

#: ``2026-01-31T23:59:59Z``: the one formatter of instants (times.utc_text), by its old name.
rfc3339 = utc_text

#: Rates one event as it is made (``pipeline``: the catalog's engine): (event key, SKU,
#: quantity, start, end) -> (what it costs or None, a rating problem or None).
Rater = Callable[[str, str, Decimal, datetime, datetime], "tuple[Optional[Rated], Optional[str]]"]

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
    head, tail = _record_metadata(segment.record, fields)
    return {**head, "elapsedFrom": segment.from_s, "elapsedTo": segment.to_s, **tail}


def _record_metadata(
    record: JobRecord, fields: Sequence[str]
) -> tuple[dict[str, Union[str, int]], dict[str, Union[str, int]]]:
    """The metadata of a run that all its segments share: what comes before the segment's
    elapsed seconds, and the job fields the config asks for (after them)."""
    head: dict[str, Union[str, int]] = {
        "cluster": record.cluster,
        "jobId": record.job_id,
        "jobIdRaw": record.job_id_raw,
        "submittedAt": utc_text(record.submit_at),
        "account": record.account,
        "partition": record.partition,
    }
    tail: dict[str, Union[str, int]] = {}
    for name in fields:
        if name == "job_name":
            tail["jobName"] = record.job_name
        else:
            value = record.extra.get(METADATA_FIELDS[name], "")
            if value:
                tail[_camel(name)] = value
    return head, tail


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def plan(
    segments: Sequence[UsageSegment],
    allocation: str,
    charges: Sequence[SkuCharge],
    metadata_fields: Sequence[str] = (),
    agent: str = "",
    rate: Optional[Rater] = None,
    problems: Optional[list[str]] = None,
) -> list[PlannedEvent]:
    """One event per segment and SKU; charges whose metric the run does not hold give none.

    ``agent`` (ledger.agent_id) names the agent in the metadata, so that the API's record
    says who billed what (a second agent on the same cluster is noticed). ``rate`` rates each
    event as it is made; its problems go to ``problems``."""
    events: list[PlannedEvent] = []
    record: Optional[JobRecord] = None
    counts: dict[Metric, Decimal] = {}
    head: dict[str, Union[str, int]] = {}
    tail: dict[str, Union[str, int]] = {}
    run_text = ""
    for segment in segments:
        if segment.record is not record:  # what a run's segments share, made once per run
            record = segment.record
            head, tail = _record_metadata(record, metadata_fields)
            if agent:
                tail["agent"] = agent
            counts = {}
            run = record.run
            run_text = run.text
        seconds = segment.to_s - segment.from_s
        stretch = f"{KEY_VERSION}:{run_text}:{segment.from_s}-{segment.to_s}:"
        final = record.final and segment.to_s == record.elapsed_s
        for charge in charges:
            metric = charge.metric
            count = counts.get(metric)
            if count is None:
                count = counts[metric] = record.tres.count(metric)
            # as quantity(): count x seconds / 3600, rounded half-even to 6 decimals
            amount = (count * seconds / SECONDS_PER_HOUR).quantize(
                QUANTUM, rounding=ROUND_HALF_EVEN
            )
            if amount <= 0:
                continue
            key = stretch + charge.sku
            meta: Mapping[str, Union[str, int]] = {
                "eventKey": key,
                **head,
                "elapsedFrom": segment.from_s,
                "elapsedTo": segment.to_s,
                **tail,
                "metric": metric,
            }
            rated: Optional[Rated] = None
            if rate is not None:
                rated, problem = rate(key, charge.sku, amount, segment.started_at, segment.ended_at)
                if problem and problems is not None:
                    problems.append(problem)
            events.append(
                PlannedEvent(
                    event_key=key,
                    allocation=allocation,
                    sku=charge.sku,
                    metric=metric,
                    quantity=amount,
                    started_at=segment.started_at,
                    ended_at=segment.ended_at,
                    user=record.user,
                    metadata=meta,
                    run=run,
                    to_s=segment.to_s,
                    final=final,
                    rated=rated,
                )
            )
    return events


def request_body(event: PlannedEvent) -> dict[str, object]:
    """The ``PostUsageEventInput`` body of an event (see the API contract)."""
    body: dict[str, object] = {
        "sku": event.sku,
        "quantity": float(event.quantity),
        "startedAt": utc_text(event.started_at),
        "endedAt": utc_text(event.ended_at),
        "metadata": dict(event.metadata),
    }
    if event.user:
        body["user"] = event.user
    return body
