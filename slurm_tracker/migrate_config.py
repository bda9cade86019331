"""``slurm-tracker migrate config``: the older Go agent's JSON config as a commented YAML config.

The Go agent (parallelworks/slurm-tracker) reads a JSON file with ``defaultSku``,
``defaultAllocation``, ``partition: [{name, sku}]`` and ``account: [{name, allocation}]``; the
organization, the API server and the key come from its command line or the environment
(``PW_API_KEY``, ``PW_PLATFORM_HOST``). It bills core-hours only, so every partition becomes a
core-hours (``cpu``) SKU here. Pure apart from ``read_old_config`` (which reads the file); the
result is checked with the regular config reader before anyone writes it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from slurm_tracker.config import config_from_text, looks_secret
from slurm_tracker.errors import ConfigError

MAX_OLD_CONFIG_BYTES = 1024 * 1024
KNOWN_KEYS = ("defaultSku", "defaultAllocation", "partition", "account")
_ENTRY_KEYS: Mapping[str, tuple[str, str]] = {
    "partition": ("name", "sku"),
    "account": ("name", "allocation"),
}
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class OldConfig:
    """The Go agent's config file, as read."""

    default_sku: str = ""
    default_allocation: str = ""
    partitions: tuple[tuple[str, str], ...] = ()  # (partition, SKU code), file order
    accounts: tuple[tuple[str, str], ...] = ()  # (account, allocation), file order


@dataclass(frozen=True)
class Migrated:
    """The YAML text and what could not be carried over (one line each)."""

    text: str
    not_carried: tuple[str, ...]


def read_old_config(path: Path) -> OldConfig:
    """Read and check the Go agent's JSON config; ConfigError (exit 3) lists every problem."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_OLD_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            source, [f"cannot read the old agent's config {path}: {exc.strerror or exc}"]
        ) from exc
    if len(raw) > MAX_OLD_CONFIG_BYTES:
        raise ConfigError(source, [f"{path} is larger than 1 MiB: not the old agent's config"])
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            source,
            [f"{path} is not JSON ({exc}): give the old Go agent's config file (config.json)"],
        ) from exc
    return old_config_from(data, source)


def old_config_from(data: object, source: str) -> OldConfig:
    """The OldConfig of decoded JSON ``data``; ConfigError lists every problem at once."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"the old agent's config is a JSON object, not {_kind(data)}"])
    problems: list[str] = []
    for key in data:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(str(key), KNOWN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"unknown key {_shown(key)}{hint}: the old agent reads only "
                f"{', '.join(KNOWN_KEYS)}; remove it or carry it over by hand"
            )
    defaults = {}
    for key in ("defaultSku", "defaultAllocation"):
        value = data.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            problems.append(f"{key}: a string, not {_kind(value)}")
            value = ""
        defaults[key] = value.strip()
    lists = {}
    for key, (name_key, value_key) in _ENTRY_KEYS.items():
        lists[key] = _entries(data.get(key), key, name_key, value_key, problems)
    if problems:
        raise ConfigError(source, problems)
    return OldConfig(
        default_sku=defaults["defaultSku"],
        default_allocation=defaults["defaultAllocation"],
        partitions=lists["partition"],
        accounts=lists["account"],
    )


def _entries(
    value: object, key: str, name_key: str, value_key: str, problems: list[str]
) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{key}: a list of {{{name_key}, {value_key}}} objects, not {_kind(value)}")
        return ()
    found: dict[str, str] = {}
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: an object {{{name_key}, {value_key}}}, not {_kind(entry)}")
            continue
        for extra in entry:
            if extra not in (name_key, value_key):
                problems.append(
                    f"{where}: unknown key {_shown(extra)} (only {name_key} and {value_key})"
                )
        name, target = entry.get(name_key), entry.get(value_key)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}.{name_key}: a non-empty string is required")
            continue
        if not isinstance(target, str) or not target.strip():
            problems.append(f"{where}.{value_key}: a non-empty string is required")
            continue
        name, target = name.strip(), target.strip()
        if name in found and found[name] != target:
            problems.append(
                f"{where}: {name!r} is mapped twice ({found[name]!r} and {target!r}); the old "
                "agent used the last one: keep one"
            )
        found[name] = target
    return tuple(found.items())


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _shown(value: object) -> str:
    text = str(value)
    if looks_secret(text):
        return repr(text[:4] + "...")
    return repr(text[:60])


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def to_yaml(
    old: OldConfig,
    *,
    cluster: str,
    organization: str = "",
    url: str = "",
    source: str = "config.json",
    state_file: str = "/var/lib/slurm-tracker/state.db",
) -> Migrated:
    """The commented YAML config equivalent to ``old`` (checked by the regular reader)."""
    not_carried: list[str] = [
        "the API key: never in the config; keep $PW_API_KEY, or write it to a file only the "
        "agent's user can read (0600) and name it in api.api_key_file",
    ]
    if not organization:
        not_carried.append("the organization (the old agent's command line): set api.organization")
    if not url:
        not_carried.append(
            "the API server: derived from the pwt_ API key; set api.url (https://HOST, the "
            "old $PW_PLATFORM_HOST) if the key does not name it"
        )
    for name, _ in (*old.accounts, *old.partitions):
        if _GLOB_CHARS & set(name):
            not_carried.append(
                f"{name!r} was an exact name for the old agent; here it is a glob pattern "
                "(check that it matches nothing else)"
            )
    lines = [
        f"# Migrated from the Go slurm-tracker config {source} by `slurm-tracker migrate config`.",
        "# The Go agent billed core-hours only: every partition is billed as core-hours here",
        "# (metric cpu). GPU-, node-, memory- or billing-hours: see config.example.yaml.",
        "# Not carried over (set by hand):",
        *(f"#   - {line}" for line in not_carried),
        f"cluster: {_q(cluster)}",
        f"state_file: {_q(state_file)}",
        "api:",
        f"  organization: {_q(organization)}"
        + ("" if organization else "   # required before `check --online` and `sync`"),
    ]
    if url:
        lines.append(f"  url: {_q(url)}")
    lines += ["accounts:", "  map:"]
    for name, allocation in old.accounts:
        lines.append(f"    {_q(name)}: {_q(allocation)}" + _glob_note(name))
    if not old.accounts:
        lines[-1] = "  map: {}"
    lines.append(
        f"  default: {_q(old.default_allocation)}"
        if old.default_allocation
        else "  default: null   # the old agent had no defaultAllocation: unmapped accounts are "
        "skipped"
    )
    lines += ["partitions:", "  map:"]
    for name, sku in old.partitions:
        lines.append(f"    {_q(name)}: {{sku: {_q(sku)}, metric: cpu}}" + _glob_note(name))
    if not old.partitions:
        lines[-1] = "  map: {}"
    lines.append(
        f"  default: {{sku: {_q(old.default_sku)}, metric: cpu}}"
        if old.default_sku
        else "  default: null   # the old agent had no defaultSku: unmapped partitions are skipped"
    )
    text = "\n".join(lines) + "\n"
    config_from_text(text, f"the config migrated from {source}")  # what `check` reads
    return Migrated(text, tuple(not_carried))


def _glob_note(name: str) -> str:
    """Names with glob characters are patterns here; the old agent matched them exactly."""
    return "   # a glob pattern here: see the note above" if _GLOB_CHARS & set(name) else ""


def summary(migrated: Migrated, written_to: Optional[str]) -> Sequence[str]:
    """Lines for stderr after the config was written or printed."""
    where = f"written to {written_to}" if written_to else "printed above"
    return [
        f"slurm-tracker: the migrated config is {where}; check it with "
        "`slurm-tracker check --config PATH`",
        *(f"slurm-tracker: not carried over: {line}" for line in migrated.not_carried),
    ]


def as_json(migrated: Migrated) -> dict[str, Any]:
    return {"config": migrated.text, "notCarried": list(migrated.not_carried)}


def cluster_from_slurm_conf(environ: Mapping[str, str]) -> Optional[str]:
    """ClusterName from slurm.conf ($SLURM_CONF, else /etc/slurm/slurm.conf), if readable."""
    path = Path(environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(MAX_OLD_CONFIG_BYTES)
    except OSError:
        return None
    found = re.search(r"^\s*ClusterName\s*=\s*([A-Za-z0-9_.-]+)", text, re.I | re.M)
    return found.group(1) if found else None


def url_from_environment(environ: Mapping[str, str]) -> str:
    """The old agent's $PW_PLATFORM_HOST as an API URL ("" when unset)."""
    host = environ.get("PW_PLATFORM_HOST", "").strip().rstrip("/")
    if not host:
        return ""
    return host if "://" in host else f"https://{host}"
