"""Values in messages: what a message may quote of a file, and what it must redact.

A message may quote what a file says, except what could be a secret: an API key pasted into the
wrong key, or a file that is no configuration at all (``--config`` naming the key file). Used by
the configuration reader, the catalog loader and the migration of old configurations.
"""

from __future__ import annotations

import json
import re

_SHOWN_MAX = 60  # longer harmless values are shortened in messages
_API_KEY_WORD = re.compile(r"(?<![A-Za-z0-9_])pwt_")  # the API key's prefix, at a word start
API_KEY = re.compile(r"(?<![A-Za-z0-9_])pwt_[A-Za-z0-9_-]+\.\S{4}")  # pwt_<host>.<secret>
_LONG_RUN = re.compile(r"\S{20,}")
ABSOLUTE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"  # time, seconds, fraction
    r"(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"  # offset
)


def looks_secret(text: str) -> bool:
    """Whether ``text`` may hold a secret: a word starting with ``pwt_`` (the API key's prefix),
    or a run of 20 or more characters without blanks that mixes letters and digits (a token or
    password). Timestamps such as 2026-01-01T00:00:00Z are not secrets."""
    if _API_KEY_WORD.search(text):
        return True
    for run in _LONG_RUN.findall(text):
        if ABSOLUTE_TIME.fullmatch(run):
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


def quoted(text: str) -> str:
    """``"text"`` (JSON quoting) when it may be shown, else its redacted form (unquoted)."""
    if looks_secret(text):
        return shown_value(text)
    return json.dumps(shown_value(text), ensure_ascii=False)


def shown_repr(value: object) -> str:
    """``repr(value)`` when it may be shown, else its redacted form (for ``'5x'``-style quoting)."""
    text = value if isinstance(value, str) else str(value)
    if looks_secret(text):
        return shown_value(text)
    return repr(shown_value(text)) if isinstance(value, str) else shown_value(text)


def redacted_words(text: str) -> str:
    """A third-party message (PyYAML, urllib, dateutil) with every secret-like word redacted:
    such messages quote pieces of the document (an alias, a tag, a port)."""

    def one(match: re.Match[str]) -> str:
        word = match.group()
        if word.strip("'\"").startswith("tag:yaml.org,2002:") and len(word) <= 80:
            return word  # a standard YAML tag, e.g. in "could not determine a constructor"
        return shown_value(word)

    return re.sub(r"\S+", one, " ".join(text.split()))
