"""One hardened YAML reader for the configuration and the catalog file (catalog_file.py).

PyYAML's SafeLoader composed with limits (depth, aliases), values that cannot be built reported
with their place, and PyYAML's errors described without quoting secrets.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.events import AliasEvent, Event
from yaml.nodes import Node, ScalarNode

from slurm_tracker.redaction import redacted_words, shown_repr, shown_value

#: Lists and mappings nested deeper than this are refused (real files nest less than 10 deep).
MAX_YAML_DEPTH = 50
#: Aliases (``*name``) may repeat at most this many nodes in all, so that no walk over the values
#: can take exponential time ("billion laughs": a few lines that expand to 10^9 values).
MAX_ALIAS_NODES = 10_000
TOO_DEEP = f"nested too deeply: more than {MAX_YAML_DEPTH} levels of lists and mappings"


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
            raise YamlRefused(None, None, TOO_DEEP, mark)
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
            shown = shown_repr(node.value) if isinstance(node, ScalarNode) else "this value"
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
        what = redacted_words(what)
        if mark is None:
            return 0, 0, what
        return mark.line + 1, mark.column + 1, what
    return 0, 0, redacted_words(str(exc))


def yaml_problem(exc: yaml.YAMLError) -> str:
    line, column, what = describe_yaml_error(exc)
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"not valid YAML: {what}"
    if not isinstance(exc, YamlRefused):
        what = f"YAML syntax error: {what} (check indentation, colons and quotes around that point)"
    return f"line {line}, column {column}: {what}" if line else what


def construct(node: Node) -> object:
    """The Python value of a node, built by PyYAML's safe constructor (no arbitrary objects);
    a value that cannot be built is a ConstructorError (see GuardedLoader)."""
    return GuardedLoader("").construct_document(node)
