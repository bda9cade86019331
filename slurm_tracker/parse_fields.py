"""Decoders of single sacct values (part of the reader, :mod:`slurm_tracker.parse`): job ids,
durations, times, states and counts as sacct prints them, the scalar values of its JSON, and
the one exception every reader turns into a Rejected. Pure functions, no I/O, no clock.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Optional

MAX_ELAPSED_S = 10 * 366 * 86400  # more than ten years of wall time is a corrupt record
_NO_VAL = 0xFFFFFFFE  # Slurm's "not set" marker for 32-bit counts
_SNIPPET = 200

_UINT_RE = re.compile(r"[0-9]+")
_JOB_ID_RE = re.compile(
    r"(?P<base>[0-9]+)"
    r"(?:_(?P<task>[0-9]+)|_\[(?P<spec>[0-9,%:\-]+)\]|\+(?P<het>[0-9]+))?"
    r"(?:\.(?P<step>\S+))?"
)
_DURATION_RE = re.compile(r"(?:(?P<days>[0-9]+)-)?(?P<clock>[0-9]+(?::[0-9]+){0,2})(?:\.[0-9]+)?")
_ISO_RE = re.compile(
    r"(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})[T ]"
    r"(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]{1,6}))?)?"
    r"(?P<off>Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_NO_DURATION = frozenset({"UNLIMITED", "INVALID", "PARTITION_LIMIT"})
_NO_TIME = frozenset({"", "UNKNOWN", "NONE"})


class _Bad(Exception):
    """One record is malformed; the message names the field and the value."""


def _snippet(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _short(value: str, limit: int = 60) -> str:
    """``value`` quoted for a message, at most ``limit`` characters of it."""
    shown = value if len(value) <= limit else value[:limit] + f"... ({len(value)} characters)"
    return repr(shown)


# --- sacct's text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobId:
    """A parsed sacct JobID: ``123``, ``123_4``, ``123_[1-5%2]``, ``123+0``, ``123.batch``."""

    text: str
    base: int
    array_task: Optional[int] = None
    array_spec: Optional[str] = None  # the pending tasks of an array meta record, e.g. "1-5%2"
    het_offset: Optional[int] = None
    step: Optional[str] = None  # "batch", "extern", "0", ... for step records

    @property
    def is_step(self) -> bool:
        return self.step is not None

    @property
    def is_pending_array(self) -> bool:
        return self.array_spec is not None


def parse_job_id(text: str) -> JobId:
    """Parse a JobID or JobIDRaw value; ValueError when it is not one."""
    stripped = text.strip()
    if stripped.isdigit() and stripped.isascii():  # the common case: a plain job id
        return JobId(text=stripped, base=int(stripped))
    match = _JOB_ID_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"{text!r} is not a Slurm job id")
    task, het = match.group("task"), match.group("het")
    return JobId(
        text=stripped,
        base=int(match.group("base")),
        array_task=int(task) if task is not None else None,
        array_spec=match.group("spec"),
        het_offset=int(het) if het is not None else None,
        step=match.group("step"),
    )


def parse_duration(text: str) -> Optional[int]:
    """Seconds in a sacct duration (``[D-]HH:MM:SS``, ``MM:SS[.mmm]``, ``D-HH[:MM]``).

    ``UNLIMITED``, ``INVALID``, ``Partition_Limit`` and empty text give None; fractions of a
    second are dropped; anything else raises ValueError.
    """
    stripped = text.strip()
    if not stripped or stripped.upper() in _NO_DURATION:
        return None
    match = _DURATION_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"{text!r} is not a duration")
    parts = [int(p) for p in match.group("clock").split(":")]
    has_fraction = "." in stripped
    if match.group("days") is not None:
        days = int(match.group("days"))
        if has_fraction and len(parts) != 3:
            raise ValueError(f"{text!r} is not a duration")
        hours, minutes, seconds = [*parts, 0, 0][:3]
        if hours >= 24:
            raise ValueError(f"{text!r} has {hours} hours after the days")
    else:
        if len(parts) == 1:
            raise ValueError(f"{text!r} is not a duration (a bare number has no unit)")
        days = 0
        hours, minutes, seconds = ([0, *parts] if len(parts) == 2 else parts)[:3]
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"{text!r} is not a duration (minutes or seconds over 59)")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _offset(text: str) -> tzinfo:
    if text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + (int(digits[2:]) if len(digits) > 2 else 0)
    return timezone(sign * timedelta(minutes=minutes))


def _localize(naive: datetime, tz: tzinfo) -> datetime:
    localize = getattr(tz, "localize", None)  # pytz zones need localize(), not replace()
    if callable(localize):
        aware: datetime = localize(naive, is_dst=True)
        return aware
    # fold=0: an ambiguous wall time (the hour repeated when DST ends) is taken as the FIRST
    # of the two instants (still in daylight saving time). sacct never prints a wall time that
    # DST skipped; how one is read then is up to the tzinfo implementation.
    return naive.replace(tzinfo=tz, fold=0)


def parse_time(text: str, tz: tzinfo = timezone.utc) -> Optional[datetime]:
    """A UTC-aware datetime from a sacct time.

    Accepts epoch seconds (``SLURM_TIME_FORMAT=%s``), ISO 8601 with an offset or ``Z``, and
    naive ISO 8601 (sacct's default), which is read as wall time in ``tz``. ``Unknown``,
    ``None``, ``0`` and empty text give None (not known yet); anything else raises ValueError.
    """
    stripped = text.strip()
    if (  # the common cases first: sacct's default naive ISO time, epoch seconds
        len(stripped) == 19
        and stripped[10] in "T "
        and stripped[4] == stripped[7] == "-"
        and stripped[13] == stripped[16] == ":"
    ):
        fast = _naive_iso(stripped)
        if fast is not None:
            if tz is timezone.utc:
                return fast.replace(tzinfo=timezone.utc)
            return _localize(fast, tz).astimezone(timezone.utc)
    if stripped.upper() in _NO_TIME:
        return None
    try:
        if stripped.isdigit() and stripped.isascii():
            seconds = int(stripped)
            if seconds == 0:
                return None  # epoch 0: not set
            return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
        match = _ISO_RE.fullmatch(stripped)
        if match is None:
            raise ValueError(f"{text!r} is not a time (expected epoch seconds or ISO 8601)")
        fraction = (match.group("f") or "").ljust(6, "0")
        naive = datetime(
            int(match.group("y")),
            int(match.group("mo")),
            int(match.group("d")),
            int(match.group("h")),
            int(match.group("mi")),
            int(match.group("s") or 0),
            int(fraction),
        )
        off = match.group("off")
        aware = naive.replace(tzinfo=_offset(off)) if off else _localize(naive, tz)
        return aware.astimezone(timezone.utc)
    except OverflowError as exc:
        raise ValueError(f"{text!r} is out of range") from exc


def _naive_iso(text: str) -> Optional[datetime]:
    """``YYYY-MM-DD[T ]HH:MM:SS`` (already checked for its separators) as a naive datetime;
    None when it is not one (the full parser then says why)."""
    digits = text[:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:]
    if not (digits.isdigit() and digits.isascii()):
        return None
    try:
        return datetime.fromisoformat(text)  # checked: ASCII digits, '-', 'T' or ' ', ':'
    except ValueError:
        return None


def parse_state(text: str) -> str:
    """The first word of a state, upper-cased: ``CANCELLED by 123`` -> ``CANCELLED``."""
    words = text.split()
    return words[0].upper() if words else ""


def _count(name: str, value: str) -> int:
    if not _UINT_RE.fullmatch(value) or len(value) > 18:
        raise ValueError(f"{name}={_short(value)} is not a plausible count")
    number = int(value)
    if number >= _NO_VAL:
        raise ValueError(f"{name}={value} is Slurm's 'no value' marker, not a count")
    return number


def _optional_count(value: str, name: str) -> int:
    stripped = value.strip()
    return _count(name, stripped) if stripped else 0


def _elapsed(value: Optional[int], name: str, start_at: Optional[datetime]) -> int:
    if value is None:
        if start_at is None:
            return 0  # not started yet: nothing ran
        raise _Bad(f"{name} is empty although the run started")
    if value < 0:
        raise _Bad(f"{name} {value} is negative")
    if value > MAX_ELAPSED_S:
        raise _Bad(f"{name} {value} is more than ten years")
    return value


# --- sacct's JSON -----------------------------------------------------------------------------


def _json_snippet(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        text = "<unprintable>"
    return _snippet(text)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _jint(value: Any, what: str) -> Optional[int]:
    """An int from a plain number or a ``{set, infinite, number}`` object; None when unset."""
    if isinstance(value, dict):
        if value.get("set") is False or value.get("infinite") is True:
            return None
        value = value.get("number")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{what} is {_json_snippet(value)}, not an integer")
    return value


def _jstr(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Bad(f"{what} is {_json_snippet(value)}, not a string")
