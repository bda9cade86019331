"""What the report groups runs by (``--by``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Optional

from slurm_tracker import rating
from slurm_tracker.config import AccountMapping, Config
from slurm_tracker.costs.intervals import Grid
from slurm_tracker.costs.model import Report, build
from slurm_tracker.costs.pricing import prices_for
from slurm_tracker.costs.steps import RunUsage, Usage

DIMENSIONS = ("account", "user", "partition", "allocation", "job-name", "job")
NONE = "(none)"


def allocation_of(account: str, accounts: AccountMapping) -> str:
    """The allocation the account is billed to, "(ignored)" or "(unmapped)"."""
    if not account:
        return NONE
    if any(fnmatchcase(account, pattern) for pattern in accounts.ignore):
        return "(ignored)"
    if account in accounts.exact:
        return accounts.exact[account]
    for pattern, allocation in accounts.patterns:
        if fnmatchcase(account, pattern):
            return allocation
    return accounts.default or "(unmapped)"


def group_function(by: str, accounts: AccountMapping) -> Callable[[RunUsage], str]:
    """The group of a run for dimension ``by`` (one of DIMENSIONS)."""
    if by not in DIMENSIONS:
        raise ValueError(f"cannot group by {by!r}: choose one of {', '.join(DIMENSIONS)}")

    def group(usage: RunUsage) -> str:
        record = usage.record
        if by == "allocation":
            return allocation_of(record.account, accounts)
        value = {
            "account": record.account,
            "user": record.user,
            "partition": record.partition,
            "job-name": record.job_name,
            "job": record.job_id,
        }[by]
        return value or NONE

    return group


def build_report(
    config: Config,
    catalog: Optional[rating.Catalog],
    usage: Usage,
    *,
    by: str,
    start_at: datetime,
    end_at: datetime,
) -> Report:
    """The report of ``usage`` over ``[start_at, end_at)``, grouped ``by``, priced from the
    config's pricing section, else the catalog."""
    prices = prices_for(config, catalog)
    notes = []
    if prices.currency is None:
        notes.append(
            "no prices: neither a pricing section nor a rating catalog (catalog_file or "
            "catalog) is configured; the chart shows core-hours"
        )
    if usage.orphan_steps:
        notes.append(f"{usage.orphan_steps} step record(s) without their job record were left out")
    return build(
        usage.runs,
        prices,
        group_function(by, config.accounts),
        Grid.of(start_at, end_at),
        by=by,
        rejected=len(usage.rejected),
        notes=notes,
    )
