"""The configuration's typed values (the dataclasses every module reads) and its key tables.

Every option is documented in ``config.example.yaml``; config.py reads the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Optional

from slurm_tracker.config_pricing import PricingConfig
from slurm_tracker.models import SkuCharge

DEFAULT_CONFIG_PATH = Path("/etc/slurm-tracker/config.yaml")
CONFIG_ENV = "SLURM_TRACKER_CONFIG"

#: Job fields that may be sent in event metadata when the config asks for them.
#: Job names are off by default: they can be private.
METADATA_FIELDS: Mapping[str, str] = {
    "job_name": "JobName",
    "qos": "QOS",
    "state": "State",
    "nodelist": "NodeList",
    "exit_code": "ExitCode",
    "reservation": "Reservation",
    "group": "Group",
}


@dataclass(frozen=True)
class ApiConfig:
    organization: str = ""
    url: Optional[str] = None  # https://host; None: derived from the pwt_ API key
    api_key_file: Optional[Path] = None  # else $PW_API_KEY
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_attempts: int = 5  # per event per sync
    max_retry_time_s: int = 300  # total time spent retrying per sync
    concurrency: int = 4
    requests_per_second: float = 0.0  # 0: no cap


@dataclass(frozen=True)
class SacctConfig:
    path: str = "sacct"
    timeout_s: int = 300
    lag_s: int = 120  # the window stops this long before now
    overlap_s: int = 3600  # re-read this much before the high-water mark
    first_sync_start: Optional[datetime] = None  # an absolute start for the very first sync...
    first_sync_lookback_s: int = 86400  # ...else now minus this
    extra_args: tuple[str, ...] = ()
    backfill_chunk_s: int = 86400
    backfill_pause_s: int = 5
    file_timezone: str = "UTC"  # zone of naive timestamps in saved files
    # The clusters this agent bills, all of them (passed as --clusters=a,b; records of any
    # other cluster are rejected). Empty: sacct's default, the local cluster only.
    clusters: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Plausibility limits: a record beyond them is rejected and quarantined, never billed.

    Defaults are above any Slurm cluster built so far; sites set them to their own size.
    """

    max_cpus: int = 4_000_000  # allocated CPUs of one run
    max_gpus: int = 250_000
    max_nodes: int = 250_000
    max_mem_mb: int = 64 * 1024**3  # 64 PiB, in MiB
    clock_skew_s: int = 300  # tolerance when comparing times of different clocks
    # An event whose quantity is above this is held for an operator (`outbox release KEY`)
    # instead of being sent; 0 holds nothing.
    hold_above: Decimal = Decimal(1_000_000)


@dataclass(frozen=True)
class AccountMapping:
    """Slurm account -> allocation name. Exact names first, then glob patterns in file order."""

    exact: Mapping[str, str] = field(default_factory=dict)
    patterns: tuple[tuple[str, str], ...] = ()
    default: Optional[str] = None
    ignore: tuple[str, ...] = ()  # exact names or glob patterns


@dataclass(frozen=True)
class PartitionMapping:
    """Slurm partition -> the SKU(s) it is billed as. Exact names first, then glob patterns."""

    exact: Mapping[str, tuple[SkuCharge, ...]] = field(default_factory=dict)
    patterns: tuple[tuple[str, tuple[SkuCharge, ...]], ...] = ()
    default: tuple[SkuCharge, ...] = ()
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class CorrectionsConfig:
    """Runs slurmdbd now says used less than was billed (see corrections.py)."""

    # Correct the API's record after each sync (delete the over-billed events, post their
    # valid part again). Off by default: `slurm-tracker corrections apply --yes` does it on demand.
    apply: bool = False


#: Health-check thresholds (`monitoring:`): name -> (kind, default warning, default critical).
#: A metric alerts when it EXCEEDS a threshold (Nagios range semantics: warning 0 on a count
#: means any at all warns). Durations are seconds.
MONITORING_THRESHOLDS: Mapping[str, tuple[str, int, int]] = {
    "last_success_age": ("duration", 30 * 60, 2 * 3600),
    "high_water_lag": ("duration", 3600, 3 * 3600),
    "failed_syncs": ("count", 2, 5),
    "dead_events": ("count", 0, 10),
    "held_events": ("count", 0, 100),
    "pending_events": ("count", 1000, 10000),
    "oldest_pending_age": ("duration", 3600, 6 * 3600),
    "quarantined": ("count", 0, 100),
}


def default_thresholds() -> Mapping[str, tuple[int, int]]:
    return {name: (warn, crit) for name, (_, warn, crit) in MONITORING_THRESHOLDS.items()}


@dataclass(frozen=True)
class MonitoringConfig:
    """`status --check` thresholds and the optional Prometheus textfile (health.py, metrics.py)."""

    metrics_file: Optional[Path] = None
    thresholds: Mapping[str, tuple[int, int]] = field(default_factory=default_thresholds)


@dataclass(frozen=True)
class Config:
    cluster: str
    state_file: Path
    api: ApiConfig
    sacct: SacctConfig
    accounts: AccountMapping
    partitions: PartitionMapping
    metadata_fields: tuple[str, ...] = ()  # keys of METADATA_FIELDS
    reporting_interval_s: int = 900  # running runs are billed in steps of at least this
    catalog_file: Optional[Path] = None  # a catalog written by `slurm-tracker catalog pull`
    catalog: Optional[Mapping[str, object]] = None  # inline `catalog:`, checked by catalog.py
    source: str = "<config>"  # where it was read from, for messages
    limits: Limits = Limits()
    corrections: CorrectionsConfig = CorrectionsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    pricing: Optional[PricingConfig] = None  # optional `pricing:` (the cost report)


DEFAULT_STATE_FILE = Path("/var/lib/slurm-tracker/state.db")

#: Every key the file may hold, by section ("" is the top level).
CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "": (
        "cluster",
        "state_file",
        "reporting_interval",
        "api",
        "sacct",
        "accounts",
        "partitions",
        "metadata",
        "catalog_file",
        "catalog",
        "limits",
        "corrections",
        "monitoring",
        "pricing",
    ),
    "api": (
        "organization",
        "url",
        "api_key_file",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
        "max_retry_time",
        "concurrency",
        "requests_per_second",
    ),
    "sacct": (
        "path",
        "timeout",
        "lag",
        "overlap",
        "first_sync_start",
        "extra_args",
        "backfill_chunk",
        "backfill_pause",
        "file_timezone",
        "clusters",
    ),
    "accounts": ("map", "default", "ignore"),
    "partitions": ("map", "default", "ignore"),
    "metadata": ("fields",),
    "limits": ("max_cpus", "max_gpus", "max_nodes", "max_memory", "clock_skew", "hold_above"),
    "corrections": ("apply",),
    "monitoring": ("metrics_file", *MONITORING_THRESHOLDS),
}
CHARGE_KEYS = ("sku", "metric")

WHERE_CONFIG_IS_READ = (
    f"the configuration is read from --config PATH, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}"
)
