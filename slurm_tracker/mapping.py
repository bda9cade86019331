"""Map stage: Slurm account -> allocation, partition -> SKU(s) and the metric each one charges.

Exact names win over glob patterns; patterns are tried in the order the config lists them.
An ignored or unmapped account or partition is not an error: the run is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional, TypeVar, Union

from slurm_tracker.config import AccountMapping, PartitionMapping
from slurm_tracker.models import JobRecord, Skipped, SkuCharge

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where a run's usage goes."""

    allocation: str
    charges: tuple[SkuCharge, ...]


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in ignore)


def _lookup(name: str, exact: Mapping[str, T], patterns: tuple[tuple[str, T], ...]) -> Optional[T]:
    if name in exact:
        return exact[name]
    for pattern, target in patterns:
        if fnmatchcase(name, pattern):
            return target
    return None


def map_record(
    record: JobRecord, accounts: AccountMapping, partitions: PartitionMapping
) -> Union[Target, Skipped]:
    """The allocation and SKUs a run is billed to, or why it is not billed."""
    account = record.account
    if not account or not record.partition:
        missing = "account" if not account else "partition"
        return Skipped(
            record.job_id,
            f"record has no {missing} (slurmdbd may not have completed it yet; "
            "it is read again by the next sync while inside the overlap)",
            record.run,
        )
    if _ignored(account, accounts.ignore):
        return Skipped(record.job_id, f"account {account!r} is ignored by the config", record.run)
    allocation = _lookup(account, accounts.exact, accounts.patterns) or accounts.default
    if not allocation:
        return Skipped(
            record.job_id,
            f"account {account!r} maps to no allocation (add it to accounts.map, "
            "accounts.default or accounts.ignore)",
            record.run,
        )
    partition = record.partition
    if _ignored(partition, partitions.ignore):
        return Skipped(
            record.job_id, f"partition {partition!r} is ignored by the config", record.run
        )
    charges = _lookup(partition, partitions.exact, partitions.patterns) or partitions.default
    if not charges:
        return Skipped(
            record.job_id,
            f"partition {partition!r} maps to no SKU (add it to partitions.map, "
            "partitions.default or partitions.ignore)",
            record.run,
        )
    return Target(allocation, charges)
