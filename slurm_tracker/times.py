"""How an instant is written for people and for the API: ONE function, :func:`utc_text`.

Every time the agent prints, logs, sends or stores as text is RFC 3339 in UTC with whole
seconds and a ``Z``: ``2026-01-31T23:59:59Z``. The value is converted to UTC first, so an
aware time in another zone is never printed as its local wall time with a ``Z``; a naive one
is taken as UTC (the project's convention: "no zone means UTC"). The fraction of a second is
dropped (not rounded), as ``strftime`` does.

Other formats are not this one: sacct's own ``-S``/``-E`` arguments (naive, no ``Z``:
``sacct.py``) and the milliseconds of the JSON log lines (``logs.py``).
"""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["UTC_FORMAT", "utc_text"]

#: The ``strftime`` format of :func:`utc_text` (for the rare value the fast path leaves).
UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_text(at: datetime) -> str:
    """``2026-01-31T23:59:59Z``: ``at`` in UTC, whole seconds (naive: taken as UTC).

    Called for every event planned and sent: a UTC value (what the agent makes everywhere) is
    written without ``strftime``; any other goes through ``astimezone`` and ``strftime``, which
    also keep strftime's spelling of years before 1000 (no zero padding)."""
    if at.tzinfo is timezone.utc and at.year >= 1000:  # the common case, without strftime
        return (
            f"{at.year:04d}-{at.month:02d}-{at.day:02d}"
            f"T{at.hour:02d}:{at.minute:02d}:{at.second:02d}Z"
        )
    if at.tzinfo is None or at.utcoffset() is None:
        return at.strftime(UTC_FORMAT)
    return at.astimezone(timezone.utc).strftime(UTC_FORMAT)
