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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Optional, TypeVar, Union, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from dateutil.parser import isoparse
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slurm_tracker.errors import ConfigError
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
    ),
    "accounts": ("map", "default", "ignore"),
    "partitions": ("map", "default", "ignore"),
    "metadata": ("fields",),
}
_CHARGE_KEYS = ("sku", "metric")

WHERE_CONFIG_IS_READ = (
    f"the configuration is read from --config PATH, else ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}"
)

# ---------------------------------------------------------------------------------- durations

_DURATION_UNITS: Mapping[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"([0-9]+)([wdhms])")
_DURATION_FORM = re.compile(r"(?:[0-9]+[wdhms])+")
MAX_DURATION_S = 100 * 366 * 86400  # a century: anything longer is a typo
_DURATION_HELP = "write whole seconds (90) or a number with a unit: 30s, 5m, 1h, 1d, 1w, or 1h30m"


def parse_duration(text: Union[str, int]) -> int:
    """Seconds in ``text``: ``30s``, ``5m``, ``1h``, ``1d``, ``1w``, ``1h30m``, or whole seconds.

    Units go from the largest to the smallest, each at most once. Raises ValueError on anything
    else, on negative values, and on durations longer than a century.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"not a duration: {text!r}; {_DURATION_HELP}")
    if isinstance(text, int):
        seconds = text
    else:
        stripped = text.strip()
        if stripped.startswith("-"):
            raise ValueError(f"negative duration {text!r}: durations are 0 or more")
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
                        f"not a duration: {text!r}: units must go from the largest to the "
                        f"smallest, each at most once (w, d, h, m, s), e.g. 1h30m"
                    )
                last = position
                seconds += int(number) * _DURATION_UNITS[unit]
        else:
            raise ValueError(f"not a duration: {text!r}; {_DURATION_HELP}")
    if seconds < 0:
        raise ValueError(f"negative duration {text!r}: durations are 0 or more")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is longer than a century: check it")
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


def load_config(path: Path) -> Config:
    """Read and validate the file at ``path``; ConfigError lists every problem found.

    Relative paths inside it are taken relative to the file's own directory.
    """
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            source, [f"{path} does not exist; {WHERE_CONFIG_IS_READ} (see config.example.yaml)"]
        ) from exc
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
    config = config_from_text(text, source, base_dir=path.absolute().parent)
    logger.debug("configuration read from %s", source)
    return config


def config_from_text(text: str, source: str, *, base_dir: Optional[Path] = None) -> Config:
    """The configuration in ``text`` (``source`` names it in messages).

    Relative paths are taken relative to ``base_dir``, else to the current directory.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(source, [_syntax_problem(exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    reader = _Reader(base_dir if base_dir is not None else Path.cwd())
    config = reader.read(root, source)
    if reader.problems or config is None:
        raise ConfigError(source, reader.sorted_problems())
    return config


def _syntax_problem(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    what = "; ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
    if mark is None:
        return f"YAML syntax error: {what}"
    return (
        f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {what} "
        "(check indentation, colons and quotes around that point)"
    )


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
_SECRET_KEYS = frozenset({"api_key", "apikey", "api-key", "api_token", "token", "pw_api_key"})
_SECRET_HELP = (
    "never put the API key in the configuration file: write it to a file only this user can "
    "read and name that file in api.api_key_file, or set $PW_API_KEY"
)
_LOOPBACK_HELP = "loopback hosts: 127.0.0.0/8, ::1, localhost"
_MAX_ALLOCATION_NAME = 255  # the API's limit
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
            shown = part if _PLAIN_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out += f".{shown}" if out else shown
    return out or "the top level"


def _line(node: Optional[Node]) -> int:
    return node.start_mark.line + 1 if node is not None else 0


def _kind(node: Node) -> str:
    """What a node holds, for "expected X, got Y" messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
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
        return f"text ({json.dumps(shown, ensure_ascii=False)})"
    return f"a value tagged {node.tag}"


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


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
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

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[tuple[int, str]] = []

    # -- reporting

    def add(self, path: Where, node: Optional[Node], message: str) -> None:
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
        if root is None:
            self.add((), None, "the file is empty: start from config.example.yaml")
            return None
        self.check_duplicates(root, (), set())
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
        )

    def check_duplicates(self, node: Node, path: Where, seen: set[int]) -> None:
        """Report keys given twice in any mapping (PyYAML would keep the last one silently)."""
        if id(node) in seen:  # aliases share nodes; also stops on recursive structures
            return
        seen.add(id(node))
        if isinstance(node, MappingNode):
            first_lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, ScalarNode) else None
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
                child: PathPart = key if key is not None else "?"
                self.check_duplicates(value_node, (*path, child), seen)
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self.check_duplicates(item, (*path, index), seen)

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
            if key.lower() in _SECRET_KEYS:
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
        """A non-empty name without surrounding blanks."""
        value = self.text(node, path, what)
        if value is None:
            return None
        if not value.strip():
            self.add(path, node, f"{what} is empty")
            return None
        if value != value.strip():
            self.add(
                path, node, f"{what} {json.dumps(value)} starts or ends with blanks: remove them"
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
        value = _construct(node)
        assert isinstance(value, int)
        if value < low or (high is not None and value > high):
            limits = f"from {low} to {high}" if high is not None else f"at least {low}"
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
        value = float(_construct(node))  # type: ignore[arg-type]
        if not math.isfinite(value) or value < 0:
            self.add(path, node, f"must be a finite number, 0 or more; got {node.value}")
            return default
        return value

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
            self.add(path, node, f"must be {least}; got {node.value}")
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
        value = self.name(entry.value, ("cluster",), "the cluster name")
        if value is not None and (":" in value or any(char.isspace() for char in value)):
            self.add(
                ("cluster",),
                entry.value,
                f"the cluster name {json.dumps(value)} must not contain blanks or ':' "
                "(it is part of event keys)",
            )
            return None
        return value

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
            self.add(path, node, f"not a valid URL: {exc}")
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
        if scheme == "http" and host and not _is_loopback(host):
            problems.append(
                f"must use https:// for {host}: plain http would send the API key in clear "
                f"text (http is allowed only to {_LOOPBACK_HELP})"
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
            except (ValueError, OverflowError) as exc:
                self.add(path, node, f"not a valid time {json.dumps(value)}: {exc}")
                return fallback
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            return parsed.astimezone(timezone.utc), defaults.first_sync_lookback_s
        try:
            lookback = parse_duration(value)
        except ValueError:
            self.add(path, node, f"neither a time nor a duration: {json.dumps(value)}; {help_text}")
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
                f"expected a list of sacct options, e.g. [--clusters=hpc1]; got {_kind(node)}",
            )
            return ()
        args: list[str] = []
        nodes: list[Node] = []
        for index, item in enumerate(node.value):
            value = self.text(item, (*path, index), "one sacct option as text")
            if value is not None:
                args.append(value)
                nodes.append(item)
        problems = sacct_arg_problems(args)
        for index, message in problems:
            self.add((*path, index), nodes[index], message)
        return () if problems else tuple(args)

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
                f"unknown time zone {json.dumps(value)}: use an IANA name such as UTC, "
                "Europe/Berlin or America/Chicago (is the tzdata package installed?)",
            )
            return default
        return value

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
                    f"{json.dumps(value)} is listed twice (also at line "
                    f"{first_lines[value]}): remove one",
                )
                continue
            first_lines[value] = _line(item)
            if value in mapped:
                self.add(
                    (*path, index),
                    item,
                    f"{json.dumps(value)} is both ignored here and mapped at line "
                    f"{mapped[value]}: remove it from one of the two",
                )
                continue
            clashes = [key for key in mapped if not _is_glob(key) and fnmatchcase(key, value)]
            if clashes:
                shown = ", ".join(f"{json.dumps(key)} (line {mapped[key]})" for key in clashes)
                self.add(
                    (*path, index),
                    item,
                    f"the pattern {json.dumps(value)} ignores {what}s that are mapped: "
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
                    f"SKU {charge.sku} is charged twice for the same runs (also at line "
                    f"{first_lines[charge.sku]}): their events would share one event key",
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
                f"the SKU code {json.dumps(value)} contains blanks: SKU codes "
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
            f"unknown metric {json.dumps(value)}; {_did_you_mean(value, METRICS)}",
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
                    f"unknown job field {json.dumps(value)}; "
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
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else _line(node)
            self.add_at(("catalog",), line, f"cannot be read: {exc.problem or exc}")
            return None
        except yaml.YAMLError as exc:
            self.add(("catalog",), node, f"cannot be read: {exc}")
            return None
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            self.add(("catalog",), node, "the catalog's keys must be names")
            return None
        return cast("dict[str, object]", data)


def _construct(node: Node) -> object:
    """The Python value of a node, built by PyYAML's safe constructor (no arbitrary objects)."""
    return SafeConstructor().construct_document(node)


# ---------------------------------------------------------------------- sacct extra arguments

# sacct's options (getopt_long, Slurm 20.11 to 25.11): short options that take a value, and
# long options by whether they take one. Long options may be abbreviated to any unique prefix.
_SACCT_SHORT_WITH_VALUE = frozenset("ACEfFgiIjkKMNoqrRsSuWx")
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

# Options the agent sets itself or that would break what it reads: (long names, short letters,
# why). Each message says why, so an admin knows what to do instead.
_SACCT_CONFLICTS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("format", "fields"), "o",
     "the agent chooses the fields it reads; other fields would break parsing"),
    (("parsable", "parsable2", "delimiter", "json", "yaml", "noheader", "long", "brief"),
     "pPnlb", "the agent chooses the output format it parses"),
    (("starttime", "endtime"), "SE",
     "the agent sets the time window itself (from the last sync, the overlap and the lag)"),
    (("allocations", "duplicates"), "XDt", "the agent already passes it"),
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
    (("help", "helpformat", "help-fields", "usage", "version", "batch-script", "env-vars"),
     "heUVB", "it prints something other than job records"),
)  # fmt: skip


def _sacct_conflict_long(name: str) -> Optional[str]:
    for names, _, why in _SACCT_CONFLICTS:
        if name in names:
            return why
    return None


def _sacct_conflict_short(letter: str) -> Optional[str]:
    for _, letters, why in _SACCT_CONFLICTS:
        if letter in letters:
            return why
    return None


def sacct_arg_problems(args: Sequence[str]) -> list[tuple[int, str]]:
    """(index, message) for each extra sacct argument that clashes with the agent's own."""
    problems: list[tuple[int, str]] = []
    index = 0
    while index < len(args):
        arg = args[index]
        takes_next = False
        problem: Optional[str] = None
        if arg in ("", "-", "--"):
            problem = f"{json.dumps(arg)} is not a sacct option: remove it"
        elif arg.startswith("--"):
            name, has_value, _ = arg[2:].partition("=")
            candidates = (
                [name]
                if name in _SACCT_LONG
                else sorted(option for option in _SACCT_LONG if option.startswith(name))
            )
            clashing = [option for option in candidates if _sacct_conflict_long(option)]
            if clashing:
                option = clashing[0]
                shown = f"--{option}" if option == name else f"--{name} (short for --{option})"
                problem = (
                    f"{shown} conflicts with the agent's own sacct options: "
                    f"{_sacct_conflict_long(option)}"
                )
            if not has_value and len(candidates) == 1:
                takes_next = candidates[0] in _SACCT_LONG_WITH_VALUE
            elif not has_value and clashing:
                takes_next = clashing[0] in _SACCT_LONG_WITH_VALUE
        elif arg.startswith("-"):
            letters = arg[1:]
            for position, letter in enumerate(letters):
                why = _sacct_conflict_short(letter)
                if why is not None and problem is None:
                    problem = (
                        f"-{letter} (in {arg}) conflicts with the agent's own sacct options: {why}"
                    )
                if letter in _SACCT_SHORT_WITH_VALUE:  # the rest of the item is its value
                    takes_next = position == len(letters) - 1
                    break
        else:
            problem = (
                f"{json.dumps(arg)} is not an option: give each option as its own item, "
                "with its value after '=' (--clusters=hpc1) or in the next item"
            )
        if problem is not None:
            problems.append((index, problem))
        index += 2 if takes_next else 1
    return problems
