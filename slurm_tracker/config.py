"""The configuration file (YAML): where it is read from, and reading it into a :class:`Config`.

Where it is read from: ``--config``, else ``$SLURM_TRACKER_CONFIG``, else
``/etc/slurm-tracker/config.yaml``. Every option is documented in ``config.example.yaml``.

This module is the entry point; the parts live in their own modules, and every public name of
them is RE-EXPORTED here on purpose (``from slurm_tracker.config import Config, load_config``
keeps working for every importer):

* config_model.py: the typed values (Config and its sections) and the key tables;
* yaml_safe.py: the hardened YAML reader, shared with the catalog loader (catalog_file.py);
* config_nodes.py: the line-aware node reader (typed values, every problem with its line);
* config_reader.py, config_sacct.py, config_mappings.py, config_pricing.py: the sections;
* config_sacct_args.py: the sacct option tables (what sacct.extra_args may hold);
* config_durations.py (``1h30m``) and redaction.py (what a message may quote).

Everything reads YAML through ``yaml.compose`` with the SafeLoader only: nodes keep line numbers,
and duplicate keys (which PyYAML would silently collapse) stay visible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import yaml

from slurm_tracker.config_durations import MAX_DURATION_S, format_duration, parse_duration
from slurm_tracker.config_model import (
    CONFIG_ENV,
    CONFIG_KEYS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATE_FILE,
    METADATA_FIELDS,
    MONITORING_THRESHOLDS,
    WHERE_CONFIG_IS_READ,
    AccountMapping,
    ApiConfig,
    Config,
    CorrectionsConfig,
    Limits,
    MonitoringConfig,
    PartitionMapping,
    SacctConfig,
)
from slurm_tracker.config_nodes import PathPart, Where
from slurm_tracker.config_pricing import (
    PRICING_KEYS,
    RESOURCE_PRICE_KEYS,
    NodePrice,
    PricingConfig,
    ResourcePrices,
    read_pricing,
)
from slurm_tracker.config_reader import MAX_CLOCK_SKEW_S, ConfigReader, is_loopback
from slurm_tracker.config_sacct import FUTURE_TOLERANCE
from slurm_tracker.config_sacct_args import SACCT_ALLOWED_HELP, sacct_arg_problems
from slurm_tracker.errors import ConfigError, UnsafeFile
from slurm_tracker.files import read_trusted
from slurm_tracker.redaction import looks_secret, shown_value
from slurm_tracker.yaml_safe import (
    MAX_ALIAS_NODES,
    MAX_YAML_DEPTH,
    TOO_DEEP,
    GuardedLoader,
    YamlRefused,
    describe_yaml_error,
    yaml_problem,
)

__all__ = [
    "CONFIG_ENV",
    "CONFIG_KEYS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_FILE",
    "FUTURE_TOLERANCE",
    "MAX_ALIAS_NODES",
    "MAX_CLOCK_SKEW_S",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION_S",
    "MAX_YAML_DEPTH",
    "METADATA_FIELDS",
    "MONITORING_THRESHOLDS",
    "PRICING_KEYS",
    "RESOURCE_PRICE_KEYS",
    "SACCT_ALLOWED_HELP",
    "WHERE_CONFIG_IS_READ",
    "AccountMapping",
    "ApiConfig",
    "Config",
    "CorrectionsConfig",
    "GuardedLoader",
    "Limits",
    "MonitoringConfig",
    "NodePrice",
    "PartitionMapping",
    "PathPart",
    "PricingConfig",
    "ResourcePrices",
    "SacctConfig",
    "Where",
    "YamlRefused",
    "config_from_text",
    "describe_yaml_error",
    "format_duration",
    "is_loopback",
    "load_config",
    "looks_secret",
    "parse_duration",
    "read_pricing",
    "resolve_config_path",
    "sacct_arg_problems",
    "shown_value",
]

logger = logging.getLogger(__name__)


def resolve_config_path(cli_path: Optional[str], environ: Mapping[str, str]) -> Path:
    """``--config`` if given, else ``$SLURM_TRACKER_CONFIG``, else the default path.

    An empty value counts as not given.
    """
    if cli_path:
        return Path(cli_path)
    from_env = environ.get(CONFIG_ENV, "")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH


#: The largest configuration file read: far more than any real one.
MAX_CONFIG_BYTES = 1 << 20


def load_config(path: Path, *, now_at: Optional[datetime] = None) -> Config:
    """Read and validate the file at ``path``; ConfigError lists every problem found.

    Relative paths inside it are taken relative to the file's own directory. The file must be
    trusted (see :func:`slurm_tracker.files.read_trusted`): a symbolic link, a file another user
    owns or can write, or one in a directory others can write is an UnsafeFile. ``now_at`` is
    the real clock (default: now), against which a first_sync_start in the future is refused.
    """
    source = str(path)
    try:
        raw = read_trusted(path, "configuration", limit=MAX_CONFIG_BYTES)
    except FileNotFoundError as exc:
        raise _missing(path) from exc
    except UnsafeFile as exc:
        if not os.path.lexists(path):  # its directory is missing: say what matters
            raise _missing(path) from exc
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            source,
            [
                f"cannot read {path}: {reason}; {WHERE_CONFIG_IS_READ}: check the path and "
                "that this user may read it"
            ],
        ) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source,
            [f"{path} is not UTF-8 text (bad byte at offset {exc.start}): save it as UTF-8"],
        ) from exc
    config = config_from_text(text, source, base_dir=path.absolute().parent, now_at=now_at)
    logger.debug("configuration read from %s", source)
    return config


def _missing(path: Path) -> ConfigError:
    return ConfigError(
        str(path), [f"{path} does not exist; {WHERE_CONFIG_IS_READ} (see config.example.yaml)"]
    )


def config_from_text(
    text: str,
    source: str,
    *,
    base_dir: Optional[Path] = None,
    now_at: Optional[datetime] = None,
) -> Config:
    """The configuration in ``text`` (``source`` names it in messages).

    Relative paths are taken relative to ``base_dir``, else to the current directory. ``now_at``
    is the real clock (default: now).
    """
    if now_at is None:
        now_at = datetime.now(timezone.utc)
    elif now_at.tzinfo is None or now_at.utcoffset() is None:
        now_at = now_at.replace(tzinfo=timezone.utc)
    try:
        root = yaml.compose(text, Loader=GuardedLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [yaml_problem(exc)]) from exc
    except RecursionError as exc:  # the depth limit makes this unreachable; kept as a backstop
        raise ConfigError(source, [TOO_DEEP]) from exc
    reader = ConfigReader(base_dir if base_dir is not None else Path.cwd(), now_at)
    try:
        config = reader.read(root, source)
    except RecursionError as exc:
        raise ConfigError(source, [TOO_DEEP]) from exc
    if reader.problems or config is None:
        raise ConfigError(source, reader.sorted_problems())
    return config
