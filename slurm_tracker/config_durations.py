"""Durations in the configuration and on the command line: ``90``, ``30s``, ``1h30m``, ``1w``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Union

from slurm_tracker.redaction import shown_repr

_DURATION_UNITS: Mapping[str, int] = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"([0-9]+)([wdhms])")
_DURATION_FORM = re.compile(r"(?:[0-9]+[wdhms])+")
MAX_DURATION_S = 100 * 366 * 86400  # a century: anything longer is a typo
DURATION_HELP = "write whole seconds (90) or a number with a unit: 30s, 5m, 1h, 1d, 1w, or 1h30m"
_MAX_DURATION_TEXT = 40  # longer is never a duration of at most a century (and int() has limits)


def parse_duration(text: Union[str, int]) -> int:
    """Seconds in ``text``: ``30s``, ``5m``, ``1h``, ``1d``, ``1w``, ``1h30m``, or whole seconds.

    Units go from the largest to the smallest, each at most once. Raises ValueError on anything
    else, on negative values, and on durations longer than a century. Messages show ``text``
    only when it does not look like a secret (see :func:`shown_value`).
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"not a duration: {shown_repr(text)}; {DURATION_HELP}")
    if isinstance(text, int):
        seconds = text
    else:
        stripped = text.strip()
        shown = shown_repr(text)
        if len(stripped) > _MAX_DURATION_TEXT:
            raise ValueError(f"not a duration: {shown} is far too long; {DURATION_HELP}")
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
            raise ValueError(f"not a duration: {shown}; {DURATION_HELP}")
    if seconds < 0:
        raise ValueError(f"negative duration {shown_repr(text)}: durations are 0 or more")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {shown_repr(text)} is longer than a century: check it")
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
