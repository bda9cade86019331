"""The configuration file (YAML): typed values, and a loader that reports every problem at once.

Where it is read from: ``--config``, else ``$SLURM_TRACKER_CONFIG``, else
``/etc/slurm-tracker/config.yaml``. Every option is documented in ``config.example.yaml``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional, TypeVar, Union, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from dateutil.parser import isoparse
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slurm_tracker.errors import ConfigError, UnsafeFile
from slurm_tracker.files import read_trusted
from slurm_tracker.models import METRICS, Metric, SkuCharge

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


def _default_thresholds() -> Mapping[str, tuple[int, int]]:
    return {name: (warn, crit) for name, (_, warn, crit) in MONITORING_THRESHOLDS.items()}


@dataclass(frozen=True)
class MonitoringConfig:
    """`status --check` thresholds and the optional Prometheus textfile (health.py, metrics.py)."""

    metrics_file: Optional[Path] = None
    thresholds: Mapping[str, tuple[int, int]] = field(default_factory=_default_thresholds)


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
    catalog: Optional[Mapping[str, object]] = None  # inline `catalog:`, validated by rating
    source: str = "<config>"  # where it was read from, for messages
    limits: Limits = Limits()
    corrections: CorrectionsConfig = CorrectionsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    pricing: Optional[PricingConfig] = None  # optional `pricing:` (the cost report)


# --------------------------------------------------------------------------------------------
# The loader. Everything below reads YAML through ``yaml.compose`` with the SafeLoader only:
# nodes keep line numbers, and duplicate keys (which PyYAML would silently collapse) stay visible.

logger = logging.getLogger(__name__)

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
_CHARGE_KEYS = ("sku", "metric")

WHERE_CONFIG_IS_READ = (
    f"the configuration is read from --config PATH, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}"
)

# ---------------------------------------------------------------------- values in messages
# A message may quote what the file says, except what could be a secret: an API key pasted
# into the wrong key, or a file that is no configuration at all (`--config` naming the key file).

_SHOWN_MAX = 60  # longer harmless values are shortened in messages
_API_KEY_WORD = re.compile(r"(?<![A-Za-z0-9_])pwt_")  # the API key's prefix, at a word start
_API_KEY = re.compile(r"(?<![A-Za-z0-9_])pwt_[A-Za-z0-9_-]+\.\S{4}")  # pwt_<host>.<secret>
_LONG_RUN = re.compile(r"\S{20,}")


def looks_secret(text: str) -> bool:
    """Whether ``text`` may hold a secret: a word starting with ``pwt_`` (the API key's prefix),
    or a run of 20 or more characters without blanks that mixes letters and digits (a token or
    password). Timestamps such as 2026-01-01T00:00:00Z are not secrets."""
    if _API_KEY_WORD.search(text):
        return True
    for run in _LONG_RUN.findall(text):
        if _ABSOLUTE_TIME.fullmatch(run):
            continue
        if any(char.isalpha() for char in run) and any(char.isdigit() for char in run):
            return True
    return False


def shown_value(text: str, *, redact: bool = False) -> str:
    """``text`` as a message may show it.

    A value that looks like a secret (:func:`looks_secret`), or any value when ``redact`` is set
    (e.g. one read from a file that is not a configuration), is shown as at most its first 4
    characters, ``…`` and "(redacted)". Other values are shown as they are, shortened when long.
    """
    if redact or looks_secret(text):
        prefix = json.dumps(text[:4], ensure_ascii=False)[1:-1]
        return f"{prefix}… (redacted)"
    if len(text) > _SHOWN_MAX:
        return text[: _SHOWN_MAX - 1] + "…"
    return text


def _quoted(text: str) -> str:
    """``"text"`` (JSON quoting) when it may be shown, else its redacted form (unquoted)."""
    if looks_secret(text):
        return shown_value(text)
    return json.dumps(shown_value(text), ensure_ascii=False)


def _shown_repr(value: object) -> str:
    """``repr(value)`` when it may be shown, else its redacted form (for ``'5x'``-style quoting)."""
    text = value if isinstance(value, str) else str(value)
    if looks_secret(text):
        return shown_value(text)
    return repr(shown_value(text)) if isinstance(value, str) else shown_value(text)


def _redacted_words(text: str) -> str:
    """A third-party message (PyYAML, urllib, dateutil) with every secret-like word redacted:
    such messages quote pieces of the document (an alias, a tag, a port)."""

    def one(match: re.Match[str]) -> str:
        word = match.group()
        if word.strip("'\"").startswith("tag:yaml.org,2002:") and len(word) <= 80:
            return word  # a standard YAML tag, e.g. in "could not determine a constructor"
        return shown_value(word)

    return re.sub(r"\S+", one, " ".join(text.split()))


# ---------------------------------------------------------------------------------- durations

_DURATION_UNITS: Mapping[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"([0-9]+)([wdhms])")
_DURATION_FORM = re.compile(r"(?:[0-9]+[wdhms])+")
MAX_DURATION_S = 100 * 366 * 86400  # a century: anything longer is a typo
_DURATION_HELP = "write whole seconds (90) or a number with a unit: 30s, 5m, 1h, 1d, 1w, or 1h30m"
_MAX_DURATION_TEXT = 40  # longer is never a duration of at most a century (and int() has limits)


def parse_duration(text: Union[str, int]) -> int:
    """Seconds in ``text``: ``30s``, ``5m``, ``1h``, ``1d``, ``1w``, ``1h30m``, or whole seconds.

    Units go from the largest to the smallest, each at most once. Raises ValueError on anything
    else, on negative values, and on durations longer than a century. Messages show ``text``
    only when it does not look like a secret (see :func:`shown_value`).
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"not a duration: {_shown_repr(text)}; {_DURATION_HELP}")
    if isinstance(text, int):
        seconds = text
    else:
        stripped = text.strip()
        shown = _shown_repr(text)
        if len(stripped) > _MAX_DURATION_TEXT:
            raise ValueError(f"not a duration: {shown} is far too long; {_DURATION_HELP}")
        if stripped.startswith("-"):
            raise ValueError(f"negative duration {shown}: durations are 0 or more")
        if re.fullmatch(r"[0-9]+", stripped):
            seconds = int(stripped)
        elif _DURATION_FORM.fullmatch(stripped):
            seconds = 0
            order = list(_DURATION_UNITS)
            last = -1
            for number, unit in _DURATION_PART.findall(stripped):
                position = order.index(unit)
                if position <= last:
                    raise ValueError(
                        f"not a duration: {shown}: units must go from the largest to the "
                        f"smallest, each at most once (w, d, h, m, s), e.g. 1h30m"
                    )
                last = position
                seconds += int(number) * _DURATION_UNITS[unit]
        else:
            raise ValueError(f"not a duration: {shown}; {_DURATION_HELP}")
    if seconds < 0:
        raise ValueError(f"negative duration {_shown_repr(text)}: durations are 0 or more")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {_shown_repr(text)} is longer than a century: check it")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest text ``parse_duration`` reads back as ``seconds``: 5400 -> ``1h30m``."""
    if seconds < 0:
        raise ValueError(f"negative duration {seconds}")
    if seconds == 0:
        return "0s"
    parts = []
    rest = seconds
    for unit, size in _DURATION_UNITS.items():
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# ------------------------------------------------------------------------------ reading YAML
# One hardened reader for the configuration and the catalog file (rating.py).

#: Lists and mappings nested deeper than this are refused (real files nest less than 10 deep).
MAX_YAML_DEPTH = 50
#: Aliases (``*name``) may repeat at most this many nodes in all, so that no walk over the values
#: can take exponential time ("billion laughs": a few lines that expand to 10^9 values).
MAX_ALIAS_NODES = 10_000
_TOO_DEEP = f"nested too deeply: more than {MAX_YAML_DEPTH} levels of lists and mappings"


class YamlRefused(ComposerError):
    """A document PyYAML could read but that is refused: too deep, or aliases that expand too
    much or contain themselves. Its ``problem`` is a whole sentence, not a syntax error."""


class GuardedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no arbitrary objects), hardened against hostile or broken files.

    * Nesting deeper than MAX_YAML_DEPTH is a :class:`YamlRefused` with its place (PyYAML composes
      recursively: a 10,000-deep ``[[[[...]]]]`` would otherwise be a RecursionError).
    * Aliases may repeat at most MAX_ALIAS_NODES nodes in all, and an alias inside the node it
      names (a structure containing itself) is refused: every later walk stays linear in the
      size of the file.
    * A value that cannot be built (``!!int abc``, a 5,000-digit integer, ``!!timestamp
      2026-13-45``) is a ConstructorError with its place, never a ValueError or AttributeError.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._composed = 0  # nodes composed so far, an alias counting as the nodes it repeats
        self._repeated = 0  # nodes repeated by aliases
        self._sizes: dict[int, int] = {}  # id(node) -> its size, once it is complete

    def compose_node(self, parent: Optional[Node], index: int) -> Optional[Node]:
        event = cast("Event", self.peek_event())  # type: ignore[no-untyped-call]
        mark = cast("Optional[Mark]", event.start_mark)
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # else PyYAML reports the undefined alias
                self._count_alias(str(event.anchor), target, mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:
            raise YamlRefused(None, None, _TOO_DEEP, mark)
        self._depth += 1
        before = self._composed
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._composed += 1
        if node is not None:
            self._sizes[id(node)] = self._composed - before
        return node

    def _count_alias(self, anchor: str, target: Node, mark: Optional[Mark]) -> None:
        size = self._sizes.get(id(target))
        if size is None:
            raise YamlRefused(
                None,
                None,
                f"the alias *{shown_value(anchor)} is used inside the value it names (a "
                "structure that contains itself): write the values out",
                mark,
            )
        self._repeated += size
        self._composed += size
        if self._repeated > MAX_ALIAS_NODES:
            raise YamlRefused(
                None,
                None,
                f"aliases (*name) repeat more than {MAX_ALIAS_NODES} values in all: write the "
                "values out instead",
                mark,
            )

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, LookupError, ArithmeticError) as exc:
            tag = str(node.tag)
            kind = tag.rsplit(":", 1)[-1] if tag.startswith("tag:yaml.org,2002:") else "its tag"
            shown = _shown_repr(node.value) if isinstance(node, ScalarNode) else "this value"
            raise ConstructorError(
                None,
                None,
                f"cannot read {shown} as {kind}: invalid or far too large",
                node.start_mark,
            ) from exc


def describe_yaml_error(exc: yaml.YAMLError) -> tuple[int, int, str]:
    """(line, column, what happened) of a PyYAML error: 1-based, 0 when unknown.

    PyYAML's own text quotes the document (its snippet, aliases, tags): only the problem and its
    context are used, with secret-looking words redacted.
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
        what = _redacted_words(what)
        if mark is None:
            return 0, 0, what
        return mark.line + 1, mark.column + 1, what
    return 0, 0, _redacted_words(str(exc))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    line, column, what = describe_yaml_error(exc)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"not valid YAML: {what}"
    if not isinstance(exc, YamlRefused):
        what = f"YAML syntax error: {what} (check indentation, colons and quotes around that point)"
    return f"line {line}, column {column}: {what}" if line else what


# ------------------------------------------------------------------------------ path and load


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
#: An absolute first_sync_start later than now plus this is a typo.
FUTURE_TOLERANCE = timedelta(minutes=5)


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
        raise ConfigError(source, [_yaml_problem(exc)]) from exc
    except RecursionError as exc:  # the depth limit makes this unreachable; kept as a backstop
        raise ConfigError(source, [_TOO_DEEP]) from exc
    reader = _Reader(base_dir if base_dir is not None else Path.cwd(), now_at)
    try:
        config = reader.read(root, source)
    except RecursionError as exc:
        raise ConfigError(source, [_TOO_DEEP]) from exc
    if reader.problems or config is None:
        raise ConfigError(source, reader.sorted_problems())
    return config


# ------------------------------------------------------------------------- the node walker

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"
_TEXT_TAGS = (_STR, _INT, _FLOAT, _TIMESTAMP)  # plain scalars read as the text written
_T = TypeVar("_T")

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_GLOB_CHARS = frozenset("*?[")
_SECRET_KEYS = frozenset(
    {"api_key", "apikey", "api_token", "token", "pw_api_key", "key", "secret", "password"}
)
_SECRET_WORDS = ("token", "secret", "password", "passwd")
_SECRET_HELP = (
    "never put the API key in the configuration file: write it to a file only this user can "
    "read and name that file in api.api_key_file, or set $PW_API_KEY"
)
_LOOPBACK_HELP = "loopback hosts: 127.0.0.0/8, ::1, localhost"
_MAX_ALLOCATION_NAME = 255  # the API's limit
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)([MGTPmgtp]?)")
_MEMORY_UNITS: Mapping[str, int] = {"": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}
MAX_CLOCK_SKEW_S = 86400  # limits.clock_skew: at most a day
_MAX_NUMBER_TEXT = 40  # digits; longer numbers are typos (and int() refuses > 4300 digits)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_MAX_CONCURRENCY = 32
_ABSOLUTE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"  # time, seconds, fraction
    r"(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"  # offset
)

PathPart = Union[str, int]
Where = tuple[PathPart, ...]


def _where(path: Where) -> str:
    """``accounts.map."chem*"``, ``sacct.extra_args[2]``: a location people can find."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _PLAIN_KEY.match(part) and not looks_secret(part) else _quoted(part)
            out += f".{shown}" if out else shown
    return out or "the top level"


def _is_secret_key(key: str) -> bool:
    """A key meant to hold a secret (api_key, token, password...): refused, its value unshown."""
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or any(word in name for word in _SECRET_WORDS)


def _utc_text(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(node: Optional[Node]) -> int:
    return node.start_mark.line + 1 if node is not None else 0


def _kind(node: Node, *, redact: bool = False) -> str:
    """What a node holds, for "expected X, got Y" messages (``redact``: never its value)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    hidden = redact or looks_secret(value)
    if hidden:
        shown = shown_value(value, redact=True)
    else:
        shown = value if len(value) <= 40 else value[:37] + "..."
    if node.tag == _NULL:
        return "nothing (an empty value)"
    if node.tag == _BOOL:
        return f"a boolean ({shown}; quote it if you mean the text)"
    if node.tag in (_INT, _FLOAT):
        return f"a number ({shown})"
    if node.tag == _TIMESTAMP:
        return f"a date ({shown})"
    if node.tag == _STR:
        return f"text ({shown if hidden else json.dumps(shown, ensure_ascii=False)})"
    return f"a value tagged {shown_value(str(node.tag), redact=redact)}"


def _is_null(node: Optional[Node]) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == _NULL)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f'did you mean "{lowered[close[0]]}"?'
    return "expected one of: " + ", ".join(choices)


def _is_glob(name: str) -> bool:
    return any(char in _GLOB_CHARS for char in name)


def is_loopback(host: str) -> bool:
    """Whether plain http may go to ``host``: ``localhost``, 127.0.0.0/8 or ::1.

    The one loopback test of the agent (the config and the API client both use it). Other
    names, ``*.localhost`` included, are resolved by DNS or /etc/hosts and could point anywhere.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Entry:
    """One key of a mapping section, with its nodes."""

    key: str
    key_node: Node
    value: Node


class _Reader:
    """Walks the composed document, building the Config and collecting every problem."""

    def __init__(self, base_dir: Path, now_at: datetime) -> None:
        self.base_dir = base_dir
        self.now_at = now_at
        self.problems: list[tuple[int, str]] = []
        self.flagged: set[int] = set()  # nodes already reported as holding an API key

    # -- reporting

    def add(self, path: Where, node: Optional[Node], message: str) -> None:
        if node is not None and id(node) in self.flagged:
            return  # reported once, as an API key: other checks would only echo it
        self.add_at(path, _line(node), message)

    def add_at(self, path: Where, line: int, message: str) -> None:
        where = _where(path)
        self.problems.append(
            (line, f"{where} (line {line}): {message}" if line else f"{where}: {message}")
        )

    def sorted_problems(self) -> list[str]:
        return [message for _, message in sorted(self.problems, key=lambda item: item[0])]

    # -- the document

    def read(self, root: Optional[Node], source: str) -> Optional[Config]:
        if _is_null(root):  # nothing, comments only, or an empty document (---)
            self.add((), None, "the file is empty: start from config.example.yaml")
            return None
        assert root is not None
        if not isinstance(root, MappingNode):
            self.not_a_configuration(root)
            return None
        self.check_nodes(root, (), set())
        top = self.fields(root, (), CONFIG_KEYS[""])
        if top is None:
            return None
        cluster = self.cluster(top.get("cluster"))
        state_file = self.path_value(top.get("state_file"), ("state_file",))
        reporting = self.duration(top.get("reporting_interval"), ("reporting_interval",), 0)
        api = self.api(top.get("api"))
        sacct = self.sacct(top.get("sacct"))
        accounts = self.accounts(top.get("accounts"))
        partitions = self.partitions(top.get("partitions"))
        metadata_fields = self.metadata(top.get("metadata"))
        catalog_file = self.path_value(top.get("catalog_file"), ("catalog_file",))
        catalog = self.catalog(top.get("catalog"))
        limits = self.limits(top.get("limits"))
        corrections = self.corrections(top.get("corrections"))
        monitoring = self.monitoring(top.get("monitoring"))
        pricing = read_pricing(self, top.get("pricing"))
        if catalog_file is not None and catalog is not None:
            self.add(
                ("catalog",),
                top["catalog"].key_node,
                "both catalog_file and an inline catalog are set: keep only one of them",
            )
        if cluster is None:
            return None
        return Config(
            cluster=cluster,
            state_file=state_file if state_file is not None else DEFAULT_STATE_FILE,
            api=api,
            sacct=sacct,
            accounts=accounts,
            partitions=partitions,
            metadata_fields=metadata_fields,
            reporting_interval_s=reporting if reporting is not None else 900,
            catalog_file=catalog_file,
            catalog=catalog,
            source=source,
            limits=limits,
            corrections=corrections,
            monitoring=monitoring,
            pricing=pricing,
        )

    def not_a_configuration(self, root: Node) -> None:
        """A file whose top level is not a mapping may be anything (an API key file, a private
        key): say so without showing more than a redacted prefix of it."""
        hint = ""
        if isinstance(root, ScalarNode) and _API_KEY.search(str(root.value)):
            hint = (
                "; it looks like an API key: the key's file belongs in api.api_key_file, "
                "never in --config"
            )
        self.add(
            (),
            root,
            "not a slurm-tracker configuration (its top level is not a mapping): expected a "
            f"mapping with keys {', '.join(CONFIG_KEYS[''])}; got {_kind(root, redact=True)}"
            f"{hint}. Check which file is read: {WHERE_CONFIG_IS_READ}",
        )

    def check_nodes(self, node: Node, path: Where, seen: set[int]) -> None:
        """Report keys given twice in any mapping (PyYAML would keep the last one silently), and
        every value or key that looks like an API key (once, without showing it)."""
        if id(node) in seen:  # aliases share nodes
            return
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            if _API_KEY.search(str(node.value)):
                self.add(
                    path,
                    node,
                    f"{_SECRET_HELP} (this value looks like one: {shown_value(str(node.value))})",
                )
                self.flagged.add(id(node))
        elif isinstance(node, MappingNode):
            first_lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, ScalarNode) else None
                child: PathPart = key if key is not None else "?"
                self.check_nodes(key_node, (*path, child), seen)
                if key is not None:
                    if key in first_lines:
                        self.add(
                            (*path, key),
                            key_node,
                            f"duplicate key: also at line {first_lines[key]}; YAML would "
                            "silently keep only the last one: remove or merge one of them",
                        )
                    else:
                        first_lines[key] = _line(key_node)
                self.check_nodes(value_node, (*path, child), seen)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self.check_nodes(item, (*path, index), seen)

    def holds_flagged(self, node: Node) -> bool:
        """Whether ``node`` or a node inside it was reported as an API key."""
        if id(node) in self.flagged:
            return True
        if isinstance(node, MappingNode):
            return any(
                self.holds_flagged(key) or self.holds_flagged(value) for key, value in node.value
            )
        if isinstance(node, SequenceNode):
            return any(self.holds_flagged(item) for item in node.value)
        return False

    # -- generic helpers (each returns None after recording a problem)

    def fields(
        self, node: Optional[Node], path: Where, allowed: Sequence[str]
    ) -> Optional[dict[str, _Entry]]:
        """The keys of a section; unknown keys are reported with a suggestion."""
        if _is_null(node):
            return {}
        assert node is not None
        if not isinstance(node, MappingNode):
            self.add(
                path, node, f"expected a mapping with keys {', '.join(allowed)}; got {_kind(node)}"
            )
            return None
        out: dict[str, _Entry] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.add(path, key_node, f"a key must be a name, not {_kind(key_node)}")
                continue
            key = str(key_node.value)
            if _is_secret_key(key):
                if not self.holds_flagged(value_node):  # else reported where the key is
                    self.add((*path, key), key_node, _SECRET_HELP)
            elif key_node.tag == _MERGE:
                self.add(
                    (*path, key),
                    key_node,
                    "merge keys (<<) are not supported here: write the keys out",
                )
            elif key not in allowed:
                self.add((*path, key), key_node, f"unknown key; {_did_you_mean(key, allowed)}")
            else:
                out[key] = _Entry(key, key_node, value_node)
        return out

    def pairs(self, node: Node, path: Where, what: str) -> Optional[list[tuple[Node, Node]]]:
        """The (key, value) node pairs of a free-form mapping (names chosen by the admin)."""
        if _is_null(node):
            return []
        if not isinstance(node, MappingNode):
            self.add(path, node, f"expected a mapping of {what}; got {_kind(node)}")
            return None
        return list(node.value)

    def text(self, node: Node, path: Where, what: str = "text") -> Optional[str]:
        """A scalar as written (so an account named 2024 stays "2024"); no booleans or nulls."""
        if not isinstance(node, ScalarNode) or node.tag not in _TEXT_TAGS:
            self.add(path, node, f"expected {what}; got {_kind(node)}")
            return None
        return str(node.value)

    def name(self, node: Node, path: Where, what: str) -> Optional[str]:
        """A non-empty name without surrounding blanks or control characters."""
        value = self.text(node, path, what)
        if value is None:
            return None
        if not value.strip():
            self.add(path, node, f"{what} is empty")
            return None
        if value != value.strip():
            self.add(path, node, f"{what} {_quoted(value)} starts or ends with blanks: remove them")
            return None
        if any(unicodedata.category(char) == "Cc" for char in value):
            self.add(
                path,
                node,
                f"{what} {_quoted(value)} contains a control character (a tab, a newline, NUL...)",
            )
            return None
        return value

    def integer(
        self, entry: Optional[_Entry], path: Where, low: int, high: Optional[int], default: int
    ) -> int:
        if entry is None:
            return default
        node = entry.value
        if not isinstance(node, ScalarNode) or node.tag != _INT:
            self.add(path, node, f"expected a whole number; got {_kind(node)}")
            return default
        limits = f"from {low} to {high}" if high is not None else f"at least {low}"
        if len(str(node.value)) > _MAX_NUMBER_TEXT:
            self.add(path, node, f"must be {limits}; got a number of {len(node.value)} digits")
            return default
        try:
            value = _construct(node)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, int):
            self.add(path, node, f"expected a whole number; got {_kind(node)}")
            return default
        if value < low or (high is not None and value > high):
            self.add(path, node, f"must be {limits}; got {value}")
            return default
        return value

    def number(self, entry: Optional[_Entry], path: Where, default: float) -> float:
        """A finite number >= 0."""
        if entry is None:
            return default
        node = entry.value
        if not isinstance(node, ScalarNode) or node.tag not in (_INT, _FLOAT):
            self.add(path, node, f"expected a number; got {_kind(node)}")
            return default
        value = math.nan
        if len(str(node.value)) <= _MAX_NUMBER_TEXT:
            try:
                value = float(cast("Union[int, float]", _construct(node)))
            except (yaml.YAMLError, TypeError, ValueError, OverflowError):
                value = math.nan
        if not math.isfinite(value) or value < 0:
            self.add(
                path,
                node,
                f"must be a finite number, 0 or more; got {shown_value(str(node.value))}",
            )
            return default
        return value

    def decimal(self, entry: Optional[_Entry], path: Where, default: Decimal) -> Decimal:
        """A finite number >= 0, exactly as written (2.5 is Decimal("2.5"), not a float)."""
        if entry is None:
            return default
        node = entry.value
        help_text = "write a number such as 1000000 or 2500.5"
        if not isinstance(node, ScalarNode) or node.tag not in (_INT, _FLOAT, _STR):
            self.add(path, node, f"expected a number; got {_kind(node)}; {help_text}")
            return default
        text = str(node.value).strip().replace("_", "")
        number: Optional[Decimal] = None
        if len(text) <= _MAX_NUMBER_TEXT and _PLAIN_NUMBER.fullmatch(text):
            try:
                number = Decimal(text)
            except InvalidOperation:
                number = None
        if number is None:
            self.add(path, node, f"expected a number; got {_kind(node)}; {help_text}")
            return default
        if number < 0:
            self.add(path, node, f"must be 0 or more; got {shown_value(text)}")
            return default
        return number

    def duration(self, entry: Optional[_Entry], path: Where, minimum: int) -> Optional[int]:
        """Seconds; None when absent or after a problem (callers keep the default)."""
        if entry is None:
            return None
        return self.duration_node(entry.value, path, minimum)

    def duration_node(self, node: Node, path: Where, minimum: int) -> Optional[int]:
        if not isinstance(node, ScalarNode) or node.tag not in (_STR, _INT):
            self.add(path, node, f"expected a duration; got {_kind(node)}; {_DURATION_HELP}")
            return None
        try:
            seconds = parse_duration(str(node.value))
        except ValueError as exc:
            self.add(path, node, str(exc))
            return None
        if seconds < minimum:
            least = "more than 0" if minimum == 1 else f"at least {format_duration(minimum)}"
            self.add(path, node, f"must be {least}; got {shown_value(str(node.value))}")
            return None
        return seconds

    def path_value(self, entry: Optional[_Entry], path: Where) -> Optional[Path]:
        """A file path; relative ones are relative to the config file's directory."""
        if entry is None or _is_null(entry.value):
            return None
        value = self.text(entry.value, path, "a file path")
        if value is None:
            return None
        if not value.strip() or "\x00" in value:
            self.add(path, entry.value, "expected a file path; got an empty or invalid one")
            return None
        result = Path(value).expanduser()
        return result if result.is_absolute() else self.base_dir / result

    # -- sections

    def cluster(self, entry: Optional[_Entry]) -> Optional[str]:
        if entry is None:
            self.add(
                ("cluster",),
                None,
                "missing: set it to the name of the Slurm cluster "
                "(used in event keys when sacct gives none)",
            )
            return None
        return self.cluster_name(entry.value, ("cluster",))

    def cluster_name(self, node: Node, path: Where) -> Optional[str]:
        """A Slurm cluster name: no blanks, ':' (event keys) or ',' (sacct --clusters lists)."""
        value = self.name(node, path, "the cluster name")
        if value is None:
            return None
        if any(char in ":," or char.isspace() for char in value):
            self.add(
                path,
                node,
                f"the cluster name {_quoted(value)} must not contain blanks, ':' or ',' "
                "(it is part of event keys and of sacct's --clusters list)",
            )
            return None
        if value.lower() in ("all", "-1"):
            self.add(
                path,
                node,
                f"{_quoted(value)} is not a cluster name: to sacct, --clusters={value} means "
                "every cluster; list each cluster this agent bills by its name",
            )
            return None
        if value.startswith("-"):
            self.add(path, node, f"the cluster name {_quoted(value)} must not start with '-'")
            return None
        return value

    def clusters(self, entry: Optional[_Entry], path: Where) -> tuple[str, ...]:
        """sacct.clusters: the clusters billed, which the agent passes as --clusters=a,b."""
        if entry is None or _is_null(entry.value):
            return ()
        node = entry.value
        if not isinstance(node, SequenceNode):
            self.add(
                path,
                node,
                f"expected a list of cluster names, e.g. [hpc1, hpc2]; got {_kind(node)}",
            )
            return ()
        out: list[str] = []
        first_lines: dict[str, int] = {}
        ok = True
        for index, item in enumerate(node.value):
            value = self.cluster_name(item, (*path, index))
            if value is None:
                ok = False
            elif value in first_lines:
                self.add(
                    (*path, index),
                    item,
                    f"{_quoted(value)} is listed twice (also at line {first_lines[value]}): "
                    "remove one",
                )
                ok = False
            else:
                first_lines[value] = _line(item)
                out.append(value)
        return tuple(out) if ok else ()

    def api(self, entry: Optional[_Entry]) -> ApiConfig:
        path: Where = ("api",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["api"]) or {}
        defaults = ApiConfig()
        organization = defaults.organization
        if "organization" in fields and not _is_null(fields["organization"].value):
            node = fields["organization"].value
            value = self.text(node, (*path, "organization"), "the organization's name")
            if value is not None:
                if "/" in value or any(char.isspace() for char in value):
                    self.add(
                        (*path, "organization"),
                        node,
                        "the organization's name cannot contain blanks or '/'",
                    )
                else:
                    organization = value
        url = self.url(fields.get("url"), (*path, "url"))
        connect = self.duration(fields.get("connect_timeout"), (*path, "connect_timeout"), 1)
        read = self.duration(fields.get("read_timeout"), (*path, "read_timeout"), 1)
        retry = self.duration(fields.get("max_retry_time"), (*path, "max_retry_time"), 0)
        return ApiConfig(
            organization=organization,
            url=url,
            api_key_file=self.path_value(fields.get("api_key_file"), (*path, "api_key_file")),
            connect_timeout_s=float(connect) if connect is not None else defaults.connect_timeout_s,
            read_timeout_s=float(read) if read is not None else defaults.read_timeout_s,
            max_attempts=self.integer(
                fields.get("max_attempts"),
                (*path, "max_attempts"),
                1,
                None,
                defaults.max_attempts,
            ),
            max_retry_time_s=retry if retry is not None else defaults.max_retry_time_s,
            concurrency=self.integer(
                fields.get("concurrency"),
                (*path, "concurrency"),
                1,
                _MAX_CONCURRENCY,
                defaults.concurrency,
            ),
            requests_per_second=self.number(
                fields.get("requests_per_second"),
                (*path, "requests_per_second"),
                defaults.requests_per_second,
            ),
        )

    def url(self, entry: Optional[_Entry], path: Where) -> Optional[str]:
        if entry is None or _is_null(entry.value):
            return None
        node = entry.value
        value = self.text(node, path, "a URL like https://activate.example.org")
        if value is None:
            return None
        try:
            parts = urlsplit(value.strip())
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            self.add(path, node, f"not a valid URL: {_redacted_words(str(exc))}")
            return None
        problems = []
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            problems.append("must start with https://")
        elif not host:
            problems.append("has no host name")
        if parts.username is not None or parts.password is not None:
            problems.append(
                "must not contain a user name or password: the API key goes in "
                "api.api_key_file or $PW_API_KEY"
            )
        if parts.query or parts.fragment:
            problems.append("must not have a query (?...) or fragment (#...)")
        if scheme == "http" and host and not is_loopback(host):
            problems.append(
                f"must use https:// for {shown_value(host)}: plain http would send the API key "
                f"in clear text (http is allowed only to {_LOOPBACK_HELP})"
            )
        for problem in problems:
            self.add(path, node, problem)
        return None if problems else value.strip().rstrip("/")

    def sacct(self, entry: Optional[_Entry]) -> SacctConfig:
        path: Where = ("sacct",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["sacct"]) or {}
        defaults = SacctConfig()
        program = defaults.path
        if "path" in fields:
            value = self.name(fields["path"].value, (*path, "path"), "the sacct program")
            program = value if value is not None else program

        def seconds(key: str, minimum: int, default: int) -> int:
            value = self.duration(fields.get(key), (*path, key), minimum)
            return value if value is not None else default

        start_at, lookback_s = self.first_sync(fields.get("first_sync_start"), defaults)
        return SacctConfig(
            path=program,
            timeout_s=seconds("timeout", 1, defaults.timeout_s),
            lag_s=seconds("lag", 0, defaults.lag_s),
            overlap_s=seconds("overlap", 0, defaults.overlap_s),
            first_sync_start=start_at,
            first_sync_lookback_s=lookback_s,
            extra_args=self.extra_args(fields.get("extra_args"), (*path, "extra_args")),
            backfill_chunk_s=seconds("backfill_chunk", 1, defaults.backfill_chunk_s),
            backfill_pause_s=seconds("backfill_pause", 0, defaults.backfill_pause_s),
            file_timezone=self.timezone(fields.get("file_timezone"), defaults.file_timezone),
            clusters=self.clusters(fields.get("clusters"), (*path, "clusters")),
        )

    def first_sync(
        self, entry: Optional[_Entry], defaults: SacctConfig
    ) -> tuple[Optional[datetime], int]:
        """An absolute start (a date or RFC 3339 time, naive = UTC) or a look-back duration."""
        fallback = (defaults.first_sync_start, defaults.first_sync_lookback_s)
        if entry is None or _is_null(entry.value):
            return fallback
        path: Where = ("sacct", "first_sync_start")
        node = entry.value
        help_text = (
            "give a date or time (2026-01-01, 2026-01-01T00:00:00Z) or how far back "
            "the first sync looks (1d, 2w)"
        )
        if not isinstance(node, ScalarNode) or node.tag not in (_STR, _INT, _TIMESTAMP):
            self.add(path, node, f"expected a time or a duration; got {_kind(node)}; {help_text}")
            return fallback
        value = str(node.value).strip()
        if _ABSOLUTE_TIME.fullmatch(value):
            try:
                parsed = isoparse(value.upper())
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=timezone.utc)
                start_at = parsed.astimezone(timezone.utc)
            except (ValueError, OverflowError) as exc:
                self.add(
                    path,
                    node,
                    f"not a valid time {_quoted(value)}: {_redacted_words(str(exc))}",
                )
                return fallback
            if start_at > self.now_at + FUTURE_TOLERANCE:
                self.add(
                    path,
                    node,
                    f"{_utc_text(start_at)} is in the future (it is now {_utc_text(self.now_at)})"
                    ": a typo? the agent would bill nothing until then; give a time in the past "
                    "or a look-back such as 1d",
                )
                return fallback
            return start_at, defaults.first_sync_lookback_s
        try:
            lookback = parse_duration(value)
        except ValueError:
            self.add(path, node, f"neither a time nor a duration: {_quoted(value)}; {help_text}")
            return fallback
        if lookback < 1:
            self.add(path, node, f"a look-back must be more than 0; {help_text}")
            return fallback
        return None, lookback

    def extra_args(self, entry: Optional[_Entry], path: Where) -> tuple[str, ...]:
        if entry is None or _is_null(entry.value):
            return ()
        node = entry.value
        if not isinstance(node, SequenceNode):
            self.add(
                path,
                node,
                f"expected a list of sacct options, e.g. [--partition=compute]; got {_kind(node)}",
            )
            return ()
        args: list[str] = []
        items: list[tuple[int, Node]] = []  # (index in the file's list, node) of each arg
        for index, item in enumerate(node.value):
            value = self.text(item, (*path, index), "one sacct option as text")
            if value is not None:
                args.append(value)
                items.append((index, item))
        problems = sacct_arg_problems(args)
        for position, message in problems:
            index, item = items[position]
            self.add((*path, index), item, message)
        return () if problems or len(args) < len(node.value) else tuple(args)

    def timezone(self, entry: Optional[_Entry], default: str) -> str:
        if entry is None:
            return default
        path: Where = ("sacct", "file_timezone")
        value = self.name(entry.value, path, "a time zone name")
        if value is None:
            return default
        if value.upper() == "UTC":
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            self.add(
                path,
                entry.value,
                f"unknown time zone {_quoted(value)}: use an IANA name such as UTC, "
                "Europe/Berlin or America/Chicago (is the tzdata package installed?)",
            )
            return default
        return value

    def limits(self, entry: Optional[_Entry]) -> Limits:
        """Plausibility limits: counts per run, memory per run, clock skew, the hold ceiling."""
        path: Where = ("limits",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["limits"]) or {}
        defaults = Limits()

        def count(key: str, default: int) -> int:
            return self.integer(fields.get(key), (*path, key), 1, None, default)

        skew = self.duration(fields.get("clock_skew"), (*path, "clock_skew"), 0)
        if skew is not None and skew > MAX_CLOCK_SKEW_S:
            self.add(
                (*path, "clock_skew"),
                fields["clock_skew"].value,
                f"must be at most {format_duration(MAX_CLOCK_SKEW_S)}; got "
                f"{format_duration(skew)}: clocks that far apart need fixing (NTP), not a "
                "tolerance",
            )
            skew = None
        return Limits(
            max_cpus=count("max_cpus", defaults.max_cpus),
            max_gpus=count("max_gpus", defaults.max_gpus),
            max_nodes=count("max_nodes", defaults.max_nodes),
            max_mem_mb=self.memory(fields.get("max_memory"), (*path, "max_memory"))
            or defaults.max_mem_mb,
            clock_skew_s=skew if skew is not None else defaults.clock_skew_s,
            hold_above=self.decimal(
                fields.get("hold_above"), (*path, "hold_above"), defaults.hold_above
            ),
        )

    def memory(self, entry: Optional[_Entry], path: Where) -> Optional[int]:
        """An amount of memory in MiB: 65536, or a number with a unit, 512G, 4T, 64P."""
        if entry is None:
            return None
        node = entry.value
        help_text = (
            "write MiB as a whole number (65536) or a number with a unit M, G, T or P "
            "(units of 1024, as Slurm prints them): 512G, 1.5T, 64P"
        )
        if not isinstance(node, ScalarNode) or node.tag not in (_STR, _INT, _FLOAT):
            self.add(path, node, f"expected an amount of memory; got {_kind(node)}; {help_text}")
            return None
        text = str(node.value).strip()
        match = _MEMORY.fullmatch(text) if len(text) <= _MAX_NUMBER_TEXT else None
        if match is None:
            self.add(path, node, f"not an amount of memory: {_quoted(text)}; {help_text}")
            return None
        number, unit = match.groups()
        if not unit and "." in number:
            self.add(path, node, f"a fraction of a MiB ({_quoted(text)}); {help_text}")
            return None
        mib = int(Decimal(number) * _MEMORY_UNITS[unit.upper()])
        if mib < 1:
            self.add(path, node, f"must be at least 1M; got {_quoted(text)}")
            return None
        return mib

    def accounts(self, entry: Optional[_Entry]) -> AccountMapping:
        exact, patterns, default, ignore = self.name_map(
            entry, "account", "allocation name", "allocations", self.allocation
        )
        return AccountMapping(exact=exact, patterns=patterns, default=default, ignore=ignore)

    def name_map(
        self,
        entry: Optional[_Entry],
        what: str,
        target: str,
        targets: str,
        parse_value: Callable[[Node, Where], Optional[_T]],
    ) -> tuple[dict[str, _T], tuple[tuple[str, _T], ...], Optional[_T], tuple[str, ...]]:
        """The `accounts` or `partitions` section: map (exact names and glob patterns, in file
        order), default and ignore list."""
        section = f"{what}s"
        path: Where = (section,)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS[section]) or {}
        exact: dict[str, _T] = {}
        patterns: dict[str, _T] = {}  # insertion order = file order
        key_lines: dict[str, int] = {}
        entries = 0
        if "map" in fields:
            map_path: Where = (*path, "map")
            pairs = self.pairs(fields["map"].value, map_path, f"Slurm {what} -> {target}")
            for key_node, value_node in pairs or []:
                entries += 1
                name = self.name(key_node, map_path, f"a Slurm {what} name")
                if name is None:
                    continue
                value = parse_value(value_node, (*map_path, name))
                key_lines[name] = _line(key_node)
                if value is not None:
                    (patterns if _is_glob(name) else exact)[name] = value
        default: Optional[_T] = None
        has_default = "default" in fields and not _is_null(fields["default"].value)
        if has_default:
            default = parse_value(fields["default"].value, (*path, "default"))
        ignore = self.ignore_list(fields.get("ignore"), (*path, "ignore"), key_lines, what)
        if entries == 0 and not has_default:
            self.add(
                path,
                entry.value if entry else None,
                f"no {what} is mapped and there is no {section}.default: nothing would "
                f"ever be billed; map Slurm {what}s to {targets} under {section}.map",
            )
        return exact, tuple(patterns.items()), default, ignore

    def allocation(self, node: Node, path: Where) -> Optional[str]:
        value = self.name(node, path, "an allocation name")
        if value is not None and len(value) > _MAX_ALLOCATION_NAME:
            self.add(
                path,
                node,
                f"an allocation name has at most {_MAX_ALLOCATION_NAME} "
                f"characters; this one has {len(value)}",
            )
            return None
        return value

    def ignore_list(
        self, entry: Optional[_Entry], path: Where, mapped: Mapping[str, int], what: str
    ) -> tuple[str, ...]:
        """Names or glob patterns never billed; one that is also mapped is a conflict."""
        if entry is None or _is_null(entry.value):
            return ()
        node = entry.value
        if not isinstance(node, SequenceNode):
            self.add(
                path,
                node,
                f"expected a list of {what} names or patterns, e.g. [root]; got {_kind(node)}",
            )
            return ()
        out: list[str] = []
        first_lines: dict[str, int] = {}
        for index, item in enumerate(node.value):
            value = self.name(
                item,
                (*path, index),
                f"an {what} name or pattern" if what[0] in "aeiou" else f"a {what} name or pattern",
            )
            if value is None:
                continue
            if value in first_lines:
                self.add(
                    (*path, index),
                    item,
                    f"{_quoted(value)} is listed twice (also at line "
                    f"{first_lines[value]}): remove one",
                )
                continue
            first_lines[value] = _line(item)
            if value in mapped:
                self.add(
                    (*path, index),
                    item,
                    f"{_quoted(value)} is both ignored here and mapped at line "
                    f"{mapped[value]}: remove it from one of the two",
                )
                continue
            clashes = [key for key in mapped if not _is_glob(key) and fnmatchcase(key, value)]
            if clashes:
                shown = ", ".join(f"{_quoted(key)} (line {mapped[key]})" for key in clashes)
                self.add(
                    (*path, index),
                    item,
                    f"the pattern {_quoted(value)} ignores {what}s that are mapped: "
                    f"{shown}; ignoring wins, so narrow the pattern or remove the mapping",
                )
                continue
            out.append(value)
        return tuple(out)

    def partitions(self, entry: Optional[_Entry]) -> PartitionMapping:
        exact, patterns, default, ignore = self.name_map(
            entry, "partition", "SKU(s)", "SKUs", self.charges
        )
        return PartitionMapping(
            exact=exact, patterns=patterns, default=default or (), ignore=ignore
        )

    def charges(self, node: Node, path: Where) -> Optional[tuple[SkuCharge, ...]]:
        """A SKU code (metric cpu), one {sku, metric} mapping, or a list of those."""
        items: list[tuple[Node, Where]]
        if isinstance(node, SequenceNode):
            if not node.value:
                self.add(path, node, "the list of SKUs is empty: give at least one")
                return None
            items = [(item, (*path, index)) for index, item in enumerate(node.value)]
        else:
            items = [(node, path)]
        charges: list[SkuCharge] = []
        first_lines: dict[str, int] = {}
        ok = True
        for item, item_path in items:
            charge = self.charge(item, item_path)
            if charge is None:
                ok = False
                continue
            if charge.sku in first_lines:
                self.add(
                    item_path,
                    item,
                    f"SKU {shown_value(charge.sku)} is charged twice for the same runs (also "
                    f"at line {first_lines[charge.sku]}): their events would share one event key",
                )
                ok = False
                continue
            first_lines[charge.sku] = _line(item)
            charges.append(charge)
        return tuple(charges) if ok else None

    def charge(self, node: Node, path: Where) -> Optional[SkuCharge]:
        if isinstance(node, MappingNode):
            fields = self.fields(node, path, _CHARGE_KEYS)
            if fields is None:
                return None
            if "sku" not in fields:
                self.add(
                    path,
                    node,
                    "missing sku: give the SKU code, e.g. {sku: SLURM_CPU_HOUR, metric: cpu}",
                )
                return None
            code = self.sku_code(fields["sku"].value, (*path, "sku"))
            metric: Optional[Metric] = "cpu"
            if "metric" in fields:
                metric = self.metric(fields["metric"].value, (*path, "metric"))
            if code is None or metric is None:
                return None
            return SkuCharge(code, metric)
        if isinstance(node, ScalarNode) and node.tag != _NULL:
            code = self.sku_code(node, path)
            return SkuCharge(code, "cpu") if code is not None else None
        self.add(
            path,
            node,
            "expected a SKU code, a mapping {sku: CODE, metric: cpu} or a list "
            f"of those; got {_kind(node)}",
        )
        return None

    def sku_code(self, node: Node, path: Where) -> Optional[str]:
        value = self.text(node, path, "a SKU code")
        if value is None:
            return None
        if not value.strip():
            self.add(path, node, "the SKU code is empty")
            return None
        if any(char.isspace() for char in value):
            self.add(
                path,
                node,
                f"the SKU code {_quoted(value)} contains blanks: SKU codes "
                "are single words like SLURM_CPU_HOUR",
            )
            return None
        return value

    def metric(self, node: Node, path: Where) -> Optional[Metric]:
        value = self.text(node, path, "a metric")
        if value is None:
            return None
        for metric in METRICS:
            if value == metric:
                return metric
        self.add(
            path,
            node,
            f"unknown metric {_quoted(value)}; {_did_you_mean(value, METRICS)}",
        )
        return None

    def metadata(self, entry: Optional[_Entry]) -> tuple[str, ...]:
        path: Where = ("metadata",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["metadata"]) or {}
        if "fields" not in fields or _is_null(fields["fields"].value):
            return ()
        node = fields["fields"].value
        list_path: Where = (*path, "fields")
        if not isinstance(node, SequenceNode):
            self.add(
                list_path, node, f"expected a list of job fields, e.g. [qos]; got {_kind(node)}"
            )
            return ()
        out: list[str] = []
        for index, item in enumerate(node.value):
            value = self.text(item, (*list_path, index), "a job field name")
            if value is None:
                continue
            if value not in METADATA_FIELDS:
                self.add(
                    (*list_path, index),
                    item,
                    f"unknown job field {_quoted(value)}; "
                    f"{_did_you_mean(value, list(METADATA_FIELDS))}",
                )
            elif value in out:
                self.add((*list_path, index), item, f"{value} is listed twice: remove one")
            else:
                out.append(value)
        return tuple(out)

    def catalog(self, entry: Optional[_Entry]) -> Optional[Mapping[str, object]]:
        """An inline catalog, stored as plain data; rating.py checks its contents."""
        if entry is None or _is_null(entry.value):
            return None
        node = entry.value
        if not isinstance(node, MappingNode):
            self.add(
                ("catalog",),
                node,
                "expected a mapping (the catalog: units with their SKUs "
                f"and rate rules); got {_kind(node)}",
            )
            return None
        try:
            data = _construct(node)
        except yaml.YAMLError as exc:
            line, _, what = describe_yaml_error(exc)
            self.add_at(("catalog",), line or _line(node), f"cannot be read: {what}")
            return None
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            self.add(("catalog",), node, "the catalog's keys must be names")
            return None
        return cast("dict[str, object]", data)

    def corrections(self, entry: Optional[_Entry]) -> CorrectionsConfig:
        """The corrections section: whether syncs apply them."""
        path: Where = ("corrections",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["corrections"])
        apply = (fields or {}).get("apply")
        if apply is None:
            return CorrectionsConfig()
        node = apply.value
        if not isinstance(node, ScalarNode) or node.tag != _BOOL:
            self.add((*path, "apply"), node, f"expected true or false; got {_kind(node)}")
            return CorrectionsConfig()
        return CorrectionsConfig(apply=bool(_construct(node)))

    def monitoring(self, entry: Optional[_Entry]) -> MonitoringConfig:
        """The monitoring section: the metrics file and warning/critical pairs."""
        path: Where = ("monitoring",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["monitoring"]) or {}
        metrics_file = self.path_value(fields.get("metrics_file"), (*path, "metrics_file"))
        thresholds = dict(_default_thresholds())
        for name, (kind, _, _) in MONITORING_THRESHOLDS.items():
            if name in fields:
                pair = self.threshold_pair(fields[name], (*path, name), kind)
                if pair is not None:
                    thresholds[name] = pair
        return MonitoringConfig(metrics_file=metrics_file, thresholds=thresholds)

    def threshold_pair(self, entry: _Entry, path: Where, kind: str) -> Optional[tuple[int, int]]:
        """``{warning: X, critical: Y}``: durations or counts, the critical not below the
        warning."""
        pair = self.fields(entry.value, path, ("warning", "critical"))
        if pair is None:
            return None
        values: list[Optional[int]] = []
        for key in ("warning", "critical"):
            if key not in pair:
                self.add(path, entry.value, f"{key}: required (a pair of warning and critical)")
                return None
            if kind == "duration":
                values.append(self.duration(pair[key], (*path, key), 0))
            else:
                values.append(self.integer(pair[key], (*path, key), 0, None, -1))
        warning, critical = values
        if warning is None or critical is None or warning < 0 or critical < 0:
            return None
        if critical < warning:
            self.add(path, entry.value, "critical must not be below warning")
            return None
        return warning, critical


def _construct(node: Node) -> object:
    """The Python value of a node, built by PyYAML's safe constructor (no arbitrary objects);
    a value that cannot be built is a ConstructorError (see GuardedLoader)."""
    return GuardedLoader("").construct_document(node)


# ---------------------------------------------------------------------- sacct extra arguments
# An ALLOW-list: sacct.extra_args may only narrow which jobs are read (by account, partition,
# QOS, user, group, WCKey, node or constraint). Anything else could read other clusters' jobs,
# change the output the agent parses, or move the window, and is refused with the reason.

#: Allowed long options (full names only), each taking a value.
_SACCT_ALLOWED_LONG = frozenset(
    {"accounts", "partition", "qos", "user", "uid", "gid", "group", "wckeys", "nodelist",
     "constraints"}
)  # fmt: skip
#: Allowed short options, each taking a value (-A physics, -Aphysics).
_SACCT_ALLOWED_SHORT = frozenset("ArqugWN")
SACCT_ALLOWED_HELP = (
    "sacct.extra_args may only narrow which jobs are read: --accounts (-A), --partition (-r), "
    "--qos (-q), --user (-u), --uid, --gid or --group (-g), --wckeys (-W), --nodelist (-N) "
    "and --constraints, each with a value (--partition=compute, or in the next item)"
)

# sacct's options (getopt_long, Slurm 20.11 to 25.11), to recognise the refused ones and their
# values: long options by whether they take a value.
_SACCT_LONG_WITH_VALUE = frozenset(
    {
        "accounts", "associations", "cluster", "clusters", "constraints", "delimiter",
        "endtime", "fields", "file", "flags", "format", "gid", "group", "jobs", "name",
        "ncpus", "nnodes", "nodelist", "partition", "qos", "reason", "starttime", "state",
        "timelimit-max", "timelimit-min", "uid", "units", "user", "wckeys",
    }
)  # fmt: skip
_SACCT_LONG_OTHER = frozenset(
    {
        "allclusters", "allocations", "allusers", "batch-script", "brief",
        "completion", "duplicates", "env-vars", "federation", "help", "help-fields",
        "helpformat", "json", "local", "long", "noconvert", "noheader", "parsable",
        "parsable2", "truncate", "usage", "verbose", "version", "whole-hetjob", "yaml",
    }
)  # fmt: skip
_SACCT_LONG = _SACCT_LONG_WITH_VALUE | _SACCT_LONG_OTHER
_SACCT_SHORT_WITH_VALUE = frozenset("ACEfFgiIjkKMNoqrRsSuWx")

_USE_CLUSTERS = (
    "it changes which clusters' jobs are read, and another cluster's jobs would be billed by "
    "this agent: use sacct.clusters to bill several clusters (the agent passes --clusters itself)"
)
# Refused options with a specific reason: (long names, short letters, why).
_SACCT_REFUSED: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("clusters", "cluster", "allclusters", "federation", "local"), "ML", _USE_CLUSTERS),
    (("format", "fields"), "o",
     "the agent chooses the fields it reads; other fields would break parsing"),
    (("parsable", "parsable2", "delimiter", "json", "yaml", "noheader", "long", "brief",
      "units", "noconvert"),
     "pPnlb", "the agent chooses the output format it parses"),
    (("starttime", "endtime"), "SE",
     "the agent sets the time window itself (from the last sync, the overlap and the lag)"),
    (("allocations", "duplicates", "allusers"), "XDa", "the agent already passes it"),
    (("state",), "s",
     "with --state, sacct selects jobs by the state they were in during the window instead "
     "of the jobs that ran in it, so usage would be missed"),
    (("jobs",), "j",
     "it would limit every sync to these jobs while the window moves on, so every other "
     "job's usage would never be billed; use `sync --sacct-file` for one-off checks"),
    (("truncate",), "T",
     "it cuts start and end times at the window's edges, which changes elapsed times and "
     "would bill runs wrongly"),
    (("completion",), "c", "it reads the job completion log instead of the accounting database"),
    (("file",), "f",
     "it reads a file instead of the accounting database; use `sync --sacct-file` to bill "
     "a saved capture"),
    (("help", "helpformat", "help-fields", "usage", "version", "batch-script", "env-vars"),
     "heUVB", "it prints something other than job records"),
)  # fmt: skip


def _sacct_refusal_long(name: str) -> str:
    for names, _, why in _SACCT_REFUSED:
        if name in names:
            return why
    return f"it is not on the allow-list; {SACCT_ALLOWED_HELP}"


def _sacct_refusal_short(letter: str) -> str:
    for _, letters, why in _SACCT_REFUSED:
        if letter in letters:
            return why
    if letter == "C":
        return "write its full name, --constraints"
    return f"it is not on the allow-list; {SACCT_ALLOWED_HELP}"


def _sacct_value_problem(option: str, value: Optional[str]) -> Optional[str]:
    """Why ``value`` cannot be the value of the allowed ``option``; None when it can."""
    usage = (
        f"{option}=VALUE or {option} VALUE as two items"
        if option.startswith("--")
        else f"{option}VALUE or {option} VALUE as two items"
    )
    if value is None:
        return f"{option} needs a value: write {usage}"
    if not value.strip():
        return f"{option} needs a value, got an empty one: write {usage}"
    if value.startswith("-"):
        return f"{option} needs a value, but {_quoted(value)} looks like an option: write {usage}"
    if value.startswith("="):
        return f"the value {_quoted(value)} of {option} starts with '=': write {usage}"
    if value != value.strip() or any(unicodedata.category(c) == "Cc" for c in value):
        return f"the value {_quoted(value)} of {option} has blanks around it or control characters"
    return None


def sacct_arg_problems(args: Sequence[str]) -> list[tuple[int, str]]:
    """(index, message) for each extra sacct argument that is not allowed.

    Only the options of SACCT_ALLOWED_HELP are allowed, by their full names, each with its value
    (``--partition=compute``, ``--partition compute``, ``-r compute`` or ``-rcompute``).
    Every other item is refused with the reason and what to do instead.
    """
    problems: list[tuple[int, str]] = []
    index = 0
    while index < len(args):
        arg = args[index]
        following = args[index + 1] if index + 1 < len(args) else None
        problem: Optional[str] = None
        skip_next = False
        if arg in ("", "-", "--"):
            problem = f"{_quoted(arg)} is not a sacct option: remove it"
        elif arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            shown = f"--{shown_value(name)}"
            if name in _SACCT_ALLOWED_LONG:
                if has_value:
                    problem = _sacct_value_problem(f"--{name}", value)
                else:
                    problem = _sacct_value_problem(f"--{name}", following)
                    skip_next = problem is None
            elif name in _SACCT_LONG:
                problem = f"{shown} is refused: {_sacct_refusal_long(name)}"
                skip_next = not has_value and name in _SACCT_LONG_WITH_VALUE
            else:
                known = sorted(option for option in _SACCT_LONG if name and option.startswith(name))
                if len(known) == 1 and known[0] in _SACCT_ALLOWED_LONG:
                    problem = (
                        f"{shown} is an abbreviation: write the full name --{known[0]} "
                        "(abbreviations are refused: they may name another option in another "
                        "Slurm version)"
                    )
                    skip_next = not has_value
                elif len(known) == 1:
                    problem = (
                        f"{shown} is an abbreviation of --{known[0]}, which is refused: "
                        f"{_sacct_refusal_long(known[0])}"
                    )
                    skip_next = not has_value and known[0] in _SACCT_LONG_WITH_VALUE
                elif known:
                    problem = (
                        f"{shown} is an abbreviation (of --{', --'.join(known)}): abbreviations "
                        f"are refused; {SACCT_ALLOWED_HELP}"
                    )
                else:
                    problem = (
                        f"{shown} is not an option sacct.extra_args allows; {SACCT_ALLOWED_HELP}"
                    )
        elif arg.startswith("-"):
            letter, rest = arg[1], arg[2:]
            if letter in _SACCT_ALLOWED_SHORT:
                if rest:
                    problem = _sacct_value_problem(f"-{letter}", rest)
                else:
                    problem = _sacct_value_problem(f"-{letter}", following)
                    skip_next = problem is None
            else:
                problem = (
                    f"-{shown_value(letter)} (in {shown_value(arg)}) is refused: "
                    f"{_sacct_refusal_short(letter)}"
                )
                skip_next = not rest and letter in _SACCT_SHORT_WITH_VALUE
        else:
            problem = (
                f"{_quoted(arg)} is not an option: give each option as its own item, "
                "with its value after '=' (--partition=compute) or in the next item"
            )
        if problem is not None:
            problems.append((index, problem))
        index += 2 if skip_next else 1
    return problems


# ---------------------------------------------------------------------- pricing (cost report)
# The optional `pricing:` section of `slurm-tracker report`: hourly prices per allocated
# resource, by partition, and node prices (by node name) for the overhead of idle capacity.
# Only the report reads it; billing always rates through the catalog.

PRICING_KEYS = ("currency", "partitions", "default", "nodes")
RESOURCE_PRICE_KEYS = ("cpu_hour", "mem_gb_hour", "gpu_hour")
_NODE_PRICE_KEYS = ("names", "node_hour")
_HOSTLIST = re.compile(r"[A-Za-z0-9_.*?-]*(?:\[[0-9,\-]+\][A-Za-z0-9_.*?-]*)*")
_CURRENCY = re.compile(r"[A-Za-z][A-Za-z0-9 ._-]{0,23}")


@dataclass(frozen=True)
class ResourcePrices:
    """Price of one hour of one allocated CPU, GB of memory (1024 MiB) and GPU."""

    cpu_hour: Decimal = Decimal(0)
    mem_gb_hour: Decimal = Decimal(0)
    gpu_hour: Decimal = Decimal(0)


@dataclass(frozen=True)
class NodePrice:
    """What one node costs per hour, allocated or idle. ``names`` is a Slurm hostlist
    (``node[01-16]``: those nodes exist, idle ones too) or a glob (``gpu*``: matches the nodes
    runs used)."""

    names: str
    node_hour: Decimal


@dataclass(frozen=True)
class PricingConfig:
    currency: str = "USD"
    exact: Mapping[str, ResourcePrices] = field(default_factory=dict)
    patterns: tuple[tuple[str, ResourcePrices], ...] = ()
    default: Optional[ResourcePrices] = None
    nodes: tuple[NodePrice, ...] = ()


def read_pricing(reader: _Reader, entry: Optional[_Entry]) -> Optional[PricingConfig]:
    """The `pricing` section; None when absent. Every problem is added to ``reader``."""
    if entry is None or _is_null(entry.value):
        return None
    path: Where = ("pricing",)
    fields = reader.fields(entry.value, path, PRICING_KEYS)
    if fields is None:
        return None
    currency = "USD"
    if "currency" in fields:
        text = reader.name(fields["currency"].value, (*path, "currency"), "a currency name")
        if text is not None and not _CURRENCY.fullmatch(text):
            reader.add(
                (*path, "currency"),
                fields["currency"].value,
                f"{_quoted(text)} is not a currency name (letters first, at most 24 characters, "
                "e.g. USD, EUR, credits)",
            )
        elif text is not None:
            currency = text
    exact: dict[str, ResourcePrices] = {}
    patterns: list[tuple[str, ResourcePrices]] = []
    if "partitions" in fields:
        part_path: Where = (*path, "partitions")
        pairs = reader.pairs(fields["partitions"].value, part_path, "partition -> prices")
        for key_node, value_node in pairs or []:
            name = reader.name(key_node, part_path, "a Slurm partition name")
            if name is None:
                continue
            prices = _resource_prices(reader, value_node, (*part_path, name))
            if prices is not None:
                if _is_glob(name):
                    patterns.append((name, prices))
                else:
                    exact[name] = prices
    default = None
    if "default" in fields and not _is_null(fields["default"].value):
        default = _resource_prices(reader, fields["default"].value, (*path, "default"))
    nodes = _node_prices(reader, fields.get("nodes"), (*path, "nodes"))
    if not any(key in fields for key in ("partitions", "default", "nodes")):
        reader.add(
            path,
            entry.value,
            "prices nothing: give pricing.partitions (or pricing.default) with cpu_hour, "
            "mem_gb_hour, gpu_hour, and/or pricing.nodes with node_hour; or remove the section "
            "(the report then uses the rating catalog)",
        )
    return PricingConfig(currency, exact, tuple(patterns), default, nodes)


def _resource_prices(reader: _Reader, node: Node, path: Where) -> Optional[ResourcePrices]:
    fields = reader.fields(node, path, RESOURCE_PRICE_KEYS)
    if fields is None:
        return None
    if not fields:
        reader.add(path, node, f"give at least one of {', '.join(RESOURCE_PRICE_KEYS)}")
        return None
    values = {
        key: reader.decimal(fields.get(key), (*path, key), Decimal(0))
        for key in RESOURCE_PRICE_KEYS
    }
    return ResourcePrices(**values)


def _node_prices(reader: _Reader, entry: Optional[_Entry], path: Where) -> tuple[NodePrice, ...]:
    if entry is None or _is_null(entry.value):
        return ()
    if not isinstance(entry.value, SequenceNode):
        reader.add(
            path,
            entry.value,
            f"expected a list of {{names: HOSTLIST, node_hour: PRICE}}; got {_kind(entry.value)}",
        )
        return ()
    found: list[NodePrice] = []
    for index, item in enumerate(entry.value.value):
        item_path: Where = (*path, index)
        fields = reader.fields(item, item_path, _NODE_PRICE_KEYS)
        if fields is None:
            continue
        missing = [key for key in _NODE_PRICE_KEYS if key not in fields]
        if missing:
            reader.add(item_path, item, f"{' and '.join(missing)}: required")
            continue
        names = reader.name(fields["names"].value, (*item_path, "names"), "a hostlist")
        price = reader.decimal(fields["node_hour"], (*item_path, "node_hour"), Decimal(-1))
        if names is not None and not _HOSTLIST.fullmatch(names.replace(",", "")):
            reader.add(
                (*item_path, "names"),
                fields["names"].value,
                f"{_quoted(names)} is not a Slurm hostlist (node[01-16],gpu[1-4]) or a glob (gpu*)",
            )
        elif names is not None and price >= 0:
            found.append(NodePrice(names, price))
    return tuple(found)
