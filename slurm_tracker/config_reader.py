"""The configuration document as a whole: the top level and the sections not read elsewhere
(api, limits, metadata, catalog, corrections, monitoring).

:class:`ConfigReader` combines the section readers (config_sacct.py, config_mappings.py and
config_pricing.py) over the generic :class:`~slurm_tracker.config_nodes.NodeReader`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Optional, cast
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slurm_tracker.config_durations import format_duration
from slurm_tracker.config_mappings import MappingReader
from slurm_tracker.config_model import (
    CONFIG_KEYS,
    DEFAULT_STATE_FILE,
    METADATA_FIELDS,
    MONITORING_THRESHOLDS,
    WHERE_CONFIG_IS_READ,
    ApiConfig,
    Config,
    CorrectionsConfig,
    Limits,
    MonitoringConfig,
    default_thresholds,
)
from slurm_tracker.config_nodes import (
    BOOL_TAG,
    FLOAT_TAG,
    INT_TAG,
    MAX_NUMBER_TEXT,
    STR_TAG,
    Entry,
    Where,
    did_you_mean,
    is_null,
    kind_of,
    line_of,
)
from slurm_tracker.config_pricing import read_pricing
from slurm_tracker.config_sacct import SacctReader
from slurm_tracker.redaction import API_KEY, quoted, redacted_words, shown_value
from slurm_tracker.yaml_safe import construct, describe_yaml_error

_LOOPBACK_HELP = "loopback hosts: 127.0.0.0/8, ::1, localhost"
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)([MGTPmgtp]?)")
_MEMORY_UNITS: Mapping[str, int] = {"": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}
MAX_CLOCK_SKEW_S = 86400  # limits.clock_skew: at most a day
_MAX_CONCURRENCY = 32


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


class ConfigReader(MappingReader, SacctReader):
    """Walks the composed document, building the Config and collecting every problem."""

    def read(self, root: Optional[Node], source: str) -> Optional[Config]:
        if is_null(root):  # nothing, comments only, or an empty document (---)
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
        if isinstance(root, ScalarNode) and API_KEY.search(str(root.value)):
            hint = (
                "; it looks like an API key: the key's file belongs in api.api_key_file, "
                "never in --config"
            )
        self.add(
            (),
            root,
            "not a slurm-tracker configuration (its top level is not a mapping): expected a "
            f"mapping with keys {', '.join(CONFIG_KEYS[''])}; got {kind_of(root, redact=True)}"
            f"{hint}. Check which file is read: {WHERE_CONFIG_IS_READ}",
        )

    def cluster(self, entry: Optional[Entry]) -> Optional[str]:
        if entry is None:
            self.add(
                ("cluster",),
                None,
                "missing: set it to the name of the Slurm cluster "
                "(used in event keys when sacct gives none)",
            )
            return None
        return self.cluster_name(entry.value, ("cluster",))

    def api(self, entry: Optional[Entry]) -> ApiConfig:
        path: Where = ("api",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["api"]) or {}
        defaults = ApiConfig()
        organization = defaults.organization
        if "organization" in fields and not is_null(fields["organization"].value):
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

    def url(self, entry: Optional[Entry], path: Where) -> Optional[str]:
        if entry is None or is_null(entry.value):
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
            self.add(path, node, f"not a valid URL: {redacted_words(str(exc))}")
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

    def limits(self, entry: Optional[Entry]) -> Limits:
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

    def memory(self, entry: Optional[Entry], path: Where) -> Optional[int]:
        """An amount of memory in MiB: 65536, or a number with a unit, 512G, 4T, 64P."""
        if entry is None:
            return None
        node = entry.value
        help_text = (
            "write MiB as a whole number (65536) or a number with a unit M, G, T or P "
            "(units of 1024, as Slurm prints them): 512G, 1.5T, 64P"
        )
        if not self.is_scalar(
            node, path, (STR_TAG, INT_TAG, FLOAT_TAG), "an amount of memory", help_text
        ):
            return None
        text = str(node.value).strip()
        match = _MEMORY.fullmatch(text) if len(text) <= MAX_NUMBER_TEXT else None
        if match is None:
            self.add(path, node, f"not an amount of memory: {quoted(text)}; {help_text}")
            return None
        number, unit = match.groups()
        if not unit and "." in number:
            self.add(path, node, f"a fraction of a MiB ({quoted(text)}); {help_text}")
            return None
        mib = int(Decimal(number) * _MEMORY_UNITS[unit.upper()])
        if mib < 1:
            self.add(path, node, f"must be at least 1M; got {quoted(text)}")
            return None
        return mib

    def metadata(self, entry: Optional[Entry]) -> tuple[str, ...]:
        path: Where = ("metadata",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["metadata"]) or {}
        if "fields" not in fields or is_null(fields["fields"].value):
            return ()
        node = fields["fields"].value
        list_path: Where = (*path, "fields")
        if not isinstance(node, SequenceNode):
            self.add(
                list_path, node, f"expected a list of job fields, e.g. [qos]; got {kind_of(node)}"
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
                    f"unknown job field {quoted(value)}; "
                    f"{did_you_mean(value, list(METADATA_FIELDS))}",
                )
            elif value in out:
                self.add((*list_path, index), item, f"{value} is listed twice: remove one")
            else:
                out.append(value)
        return tuple(out)

    def catalog(self, entry: Optional[Entry]) -> Optional[Mapping[str, object]]:
        """An inline catalog, stored as plain data; catalog.py checks its contents."""
        if entry is None or is_null(entry.value):
            return None
        node = entry.value
        if not isinstance(node, MappingNode):
            self.add(
                ("catalog",),
                node,
                "expected a mapping (the catalog: units with their SKUs "
                f"and rate rules); got {kind_of(node)}",
            )
            return None
        try:
            data = construct(node)
        except yaml.YAMLError as exc:
            line, _, what = describe_yaml_error(exc)
            self.add_at(("catalog",), line or line_of(node), f"cannot be read: {what}")
            return None
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            self.add(("catalog",), node, "the catalog's keys must be names")
            return None
        return cast("dict[str, object]", data)

    def corrections(self, entry: Optional[Entry]) -> CorrectionsConfig:
        """The corrections section: whether syncs apply them."""
        path: Where = ("corrections",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["corrections"])
        apply = (fields or {}).get("apply")
        if apply is None:
            return CorrectionsConfig()
        node = apply.value
        if not self.is_scalar(node, (*path, "apply"), (BOOL_TAG,), "true or false"):
            return CorrectionsConfig()
        return CorrectionsConfig(apply=bool(construct(node)))

    def monitoring(self, entry: Optional[Entry]) -> MonitoringConfig:
        """The monitoring section: the metrics file and warning/critical pairs."""
        path: Where = ("monitoring",)
        fields = self.fields(entry.value if entry else None, path, CONFIG_KEYS["monitoring"]) or {}
        metrics_file = self.path_value(fields.get("metrics_file"), (*path, "metrics_file"))
        thresholds = dict(default_thresholds())
        for name, (kind, _, _) in MONITORING_THRESHOLDS.items():
            if name in fields:
                pair = self.threshold_pair(fields[name], (*path, name), kind)
                if pair is not None:
                    thresholds[name] = pair
        return MonitoringConfig(metrics_file=metrics_file, thresholds=thresholds)

    def threshold_pair(self, entry: Entry, path: Where, kind: str) -> Optional[tuple[int, int]]:
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
