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
    decided = _decide(record.account, record.partition, accounts, partitions)
    if isinstance(decided, str):
        return Skipped(record.job_id, decided, record.run)
    return decided


class Mapper:
    """:func:`map_record` with its decisions remembered per (account, partition): a month of a
    busy cluster has millions of runs but a few thousand pairs (at most ``limit`` are kept)."""

    def __init__(
        self, accounts: AccountMapping, partitions: PartitionMapping, limit: int = 1 << 16
    ) -> None:
        self.accounts = accounts
        self.partitions = partitions
        self.limit = limit
        self._decided: dict[tuple[str, str], Union[Target, str]] = {}

    def __call__(self, record: JobRecord) -> Union[Target, Skipped]:
        pair = (record.account, record.partition)
        decided = self._decided.get(pair)
        if decided is None:
            decided = _decide(record.account, record.partition, self.accounts, self.partitions)
            if len(self._decided) >= self.limit:
                self._decided.clear()
            self._decided[pair] = decided
        if isinstance(decided, str):
            return Skipped(record.job_id, decided, record.run)
        return decided


def _decide(
    account: str, partition: str, accounts: AccountMapping, partitions: PartitionMapping
) -> Union[Target, str]:
    """Where the usage of a run of ``account`` in ``partition`` goes, or why it is not billed."""
    if not account or not partition:
        missing = "account" if not account else "partition"
        return (
            f"record has no {missing} (slurmdbd may not have completed it yet; "
            "it is read again by the next sync while inside the overlap)"
        )
    if _ignored(account, accounts.ignore):
        return f"account {account!r} is ignored by the config"
    allocation = _lookup(account, accounts.exact, accounts.patterns) or accounts.default
    if not allocation:
        return (
            f"account {account!r} maps to no allocation (add it to accounts.map, "
            "accounts.default or accounts.ignore)"
        )
    if _ignored(partition, partitions.ignore):
        return f"partition {partition!r} is ignored by the config"
    charges = _lookup(partition, partitions.exact, partitions.patterns) or partitions.default
    if not charges:
        return (
            f"partition {partition!r} maps to no SKU (add it to partitions.map, "
            "partitions.default or partitions.ignore)"
        )
    return Target(allocation, charges)
