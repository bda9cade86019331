"""The line-aware reader of composed YAML nodes: typed values, and every problem with its line.

:class:`NodeReader` reads the values of a document composed by :mod:`slurm_tracker.yaml_safe`
(names, numbers, durations, paths, lists of names), records each problem with the dotted path
and line of the value (``sacct.extra_args[2] (line 14): ...``) and returns None (or the default)
after a problem, so that one pass reports every problem of the file. The configuration's
sections are read by its subclasses (config_reader.py, config_sacct.py, config_mappings.py) and
by config_pricing.py.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional, Union, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slurm_tracker.config_durations import (
    DURATION_HELP,
    format_duration,
    parse_duration,
)
from slurm_tracker.redaction import API_KEY, looks_secret, quoted, shown_value
from slurm_tracker.yaml_safe import construct

NULL_TAG = "tag:yaml.org,2002:null"
BOOL_TAG = "tag:yaml.org,2002:bool"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
STR_TAG = "tag:yaml.org,2002:str"
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
MERGE_TAG = "tag:yaml.org,2002:merge"
TEXT_TAGS = (STR_TAG, INT_TAG, FLOAT_TAG, TIMESTAMP_TAG)  # plain scalars read as the text written

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_GLOB_CHARS = frozenset("*?[")
_SECRET_KEYS = frozenset(
    {"api_key", "apikey", "api_token", "token", "pw_api_key", "key", "secret", "password"}
)
_SECRET_WORDS = ("token", "secret", "password", "passwd")
SECRET_HELP = (
    "never put the API key in the configuration file: write it to a file only this user can "
    "read and name that file in api.api_key_file, or set $PW_API_KEY"
)
MAX_NUMBER_TEXT = 40  # digits; longer numbers are typos (and int() refuses > 4300 digits)
_PLAIN_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")

PathPart = Union[str, int]
Where = tuple[PathPart, ...]


def where_text(path: Where) -> str:
    """``accounts.map."chem*"``, ``sacct.extra_args[2]``: a location people can find."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _PLAIN_KEY.match(part) and not looks_secret(part) else quoted(part)
            out += f".{shown}" if out else shown
    return out or "the top level"


def _is_secret_key(key: str) -> bool:
    """A key meant to hold a secret (api_key, token, password...): refused, its value unshown."""
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or any(word in name for word in _SECRET_WORDS)


def line_of(node: Optional[Node]) -> int:
    return node.start_mark.line + 1 if node is not None else 0


def kind_of(node: Node, *, redact: bool = False) -> str:
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
    if node.tag == NULL_TAG:
        return "nothing (an empty value)"
    if node.tag == BOOL_TAG:
        return f"a boolean ({shown}; quote it if you mean the text)"
    if node.tag in (INT_TAG, FLOAT_TAG):
        return f"a number ({shown})"
    if node.tag == TIMESTAMP_TAG:
        return f"a date ({shown})"
    if node.tag == STR_TAG:
        return f"text ({shown if hidden else json.dumps(shown, ensure_ascii=False)})"
    return f"a value tagged {shown_value(str(node.tag), redact=redact)}"


def is_null(node: Optional[Node]) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == NULL_TAG)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f'did you mean "{lowered[close[0]]}"?'
    return "expected one of: " + ", ".join(choices)


def is_glob(name: str) -> bool:
    return any(char in _GLOB_CHARS for char in name)


@dataclass(frozen=True)
class Entry:
    """One key of a mapping section, with its nodes."""

    key: str
    key_node: Node
    value: Node


class NodeReader:
    """Reads values from composed nodes, collecting every problem with its place."""

    def __init__(self, base_dir: Path, now_at: datetime) -> None:
        self.base_dir = base_dir
        self.now_at = now_at
        self.problems: list[tuple[int, str]] = []
        self.flagged: set[int] = set()  # nodes already reported as holding an API key

    # -- reporting

    def add(self, path: Where, node: Optional[Node], message: str) -> None:
        if node is not None and id(node) in self.flagged:
            return  # reported once, as an API key: other checks would only echo it
        self.add_at(path, line_of(node), message)

    def add_at(self, path: Where, line: int, message: str) -> None:
        where = where_text(path)
        self.problems.append(
            (line, f"{where} (line {line}): {message}" if line else f"{where}: {message}")
        )

    def sorted_problems(self) -> list[str]:
        return [message for _, message in sorted(self.problems, key=lambda item: item[0])]

    def check_nodes(self, node: Node, path: Where, seen: set[int]) -> None:
        """Report keys given twice in any mapping (PyYAML would keep the last one silently), and
        every value or key that looks like an API key (once, without showing it)."""
        if id(node) in seen:  # aliases share nodes
            return
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            if API_KEY.search(str(node.value)):
                self.add(
                    path,
                    node,
                    f"{SECRET_HELP} (this value looks like one: {shown_value(str(node.value))})",
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
                        first_lines[key] = line_of(key_node)
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
    ) -> Optional[dict[str, Entry]]:
        """The keys of a section; unknown keys are reported with a suggestion."""
        if is_null(node):
            return {}
        assert node is not None
        if not isinstance(node, MappingNode):
            self.add(
                path,
                node,
                f"expected a mapping with keys {', '.join(allowed)}; got {kind_of(node)}",
            )
            return None
        out: dict[str, Entry] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.add(path, key_node, f"a key must be a name, not {kind_of(key_node)}")
                continue
            key = str(key_node.value)
            if _is_secret_key(key):
                if not self.holds_flagged(value_node):  # else reported where the key is
                    self.add((*path, key), key_node, SECRET_HELP)
            elif key_node.tag == MERGE_TAG:
                self.add(
                    (*path, key),
                    key_node,
                    "merge keys (<<) are not supported here: write the keys out",
                )
            elif key not in allowed:
                self.add((*path, key), key_node, f"unknown key; {did_you_mean(key, allowed)}")
            else:
                out[key] = Entry(key, key_node, value_node)
        return out

    def pairs(self, node: Node, path: Where, what: str) -> Optional[list[tuple[Node, Node]]]:
        """The (key, value) node pairs of a free-form mapping (names chosen by the admin)."""
        if is_null(node):
            return []
        if not isinstance(node, MappingNode):
            self.add(path, node, f"expected a mapping of {what}; got {kind_of(node)}")
            return None
        return list(node.value)

    def is_scalar(
        self, node: Node, path: Where, tags: Sequence[str], expected: str, help_text: str = ""
    ) -> bool:
        """Whether ``node`` is a scalar with one of ``tags``; else records "expected
        ``expected``; got what it is" (then ``help_text``) and returns False."""
        if isinstance(node, ScalarNode) and node.tag in tags:
            return True
        more = f"; {help_text}" if help_text else ""
        self.add(path, node, f"expected {expected}; got {kind_of(node)}{more}")
        return False

    def text(self, node: Node, path: Where, what: str = "text") -> Optional[str]:
        """A scalar as written (so an account named 2024 stays "2024"); no booleans or nulls."""
        if not self.is_scalar(node, path, TEXT_TAGS, what):
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
            self.add(path, node, f"{what} {quoted(value)} starts or ends with blanks: remove them")
            return None
        if any(unicodedata.category(char) == "Cc" for char in value):
            self.add(
                path,
                node,
                f"{what} {quoted(value)} contains a control character (a tab, a newline, NUL...)",
            )
            return None
        return value

    def integer(
        self, entry: Optional[Entry], path: Where, low: int, high: Optional[int], default: int
    ) -> int:
        if entry is None:
            return default
        node = entry.value
        if not self.is_scalar(node, path, (INT_TAG,), "a whole number"):
            return default
        limits = f"from {low} to {high}" if high is not None else f"at least {low}"
        if len(str(node.value)) > MAX_NUMBER_TEXT:
            self.add(path, node, f"must be {limits}; got a number of {len(node.value)} digits")
            return default
        try:
            value = construct(node)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, int):
            self.add(path, node, f"expected a whole number; got {kind_of(node)}")
            return default
        if value < low or (high is not None and value > high):
            self.add(path, node, f"must be {limits}; got {value}")
            return default
        return value

    def number(self, entry: Optional[Entry], path: Where, default: float) -> float:
        """A finite number >= 0."""
        if entry is None:
            return default
        node = entry.value
        if not self.is_scalar(node, path, (INT_TAG, FLOAT_TAG), "a number"):
            return default
        value = math.nan
        if len(str(node.value)) <= MAX_NUMBER_TEXT:
            try:
                value = float(cast("Union[int, float]", construct(node)))
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

    def decimal(self, entry: Optional[Entry], path: Where, default: Decimal) -> Decimal:
        """A finite number >= 0, exactly as written (2.5 is Decimal("2.5"), not a float)."""
        if entry is None:
            return default
        node = entry.value
        help_text = "write a number such as 1000000 or 2500.5"
        if not self.is_scalar(node, path, (INT_TAG, FLOAT_TAG, STR_TAG), "a number", help_text):
            return default
        text = str(node.value).strip().replace("_", "")
        number: Optional[Decimal] = None
        if len(text) <= MAX_NUMBER_TEXT and _PLAIN_NUMBER.fullmatch(text):
            try:
                number = Decimal(text)
            except InvalidOperation:
                number = None
        if number is None:
            self.add(path, node, f"expected a number; got {kind_of(node)}; {help_text}")
            return default
        if number < 0:
            self.add(path, node, f"must be 0 or more; got {shown_value(text)}")
            return default
        return number

    def duration(self, entry: Optional[Entry], path: Where, minimum: int) -> Optional[int]:
        """Seconds; None when absent or after a problem (callers keep the default)."""
        if entry is None:
            return None
        return self.duration_node(entry.value, path, minimum)

    def duration_node(self, node: Node, path: Where, minimum: int) -> Optional[int]:
        if not self.is_scalar(node, path, (STR_TAG, INT_TAG), "a duration", DURATION_HELP):
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

    def path_value(self, entry: Optional[Entry], path: Where) -> Optional[Path]:
        """A file path; relative ones are relative to the config file's directory."""
        if entry is None or is_null(entry.value):
            return None
        value = self.text(entry.value, path, "a file path")
        if value is None:
            return None
        if not value.strip() or "\x00" in value:
            self.add(path, entry.value, "expected a file path; got an empty or invalid one")
            return None
        result = Path(value).expanduser()
        return result if result.is_absolute() else self.base_dir / result

    def name_list(
        self,
        entry: Optional[Entry],
        path: Where,
        expected: str,
        read_item: Callable[[Node, Where], Optional[str]],
        accept: Callable[[str, Node, Where], bool] = lambda *_: True,
    ) -> tuple[tuple[str, ...], bool]:
        """A list of distinct names (sacct.clusters, accounts.ignore, partitions.ignore).

        Returns the names read and whether every item was good. Each item is read by
        ``read_item``; one listed twice is reported with the line of its first mention; ``accept``
        may refuse an item after recording why. ``expected`` says what the list holds, for the
        message when the value is not a list.
        """
        if entry is None or is_null(entry.value):
            return (), True
        node = entry.value
        if not isinstance(node, SequenceNode):
            self.add(path, node, f"expected {expected}; got {kind_of(node)}")
            return (), False
        out: list[str] = []
        first_lines: dict[str, int] = {}
        ok = True
        for index, item in enumerate(node.value):
            item_path: Where = (*path, index)
            value = read_item(item, item_path)
            if value is None:
                ok = False
                continue
            if value in first_lines:
                self.add(
                    item_path,
                    item,
                    f"{quoted(value)} is listed twice (also at line {first_lines[value]}): "
                    "remove one",
                )
                ok = False
                continue
            first_lines[value] = line_of(item)
            if not accept(value, item, item_path):
                ok = False
                continue
            out.append(value)
        return tuple(out), ok
