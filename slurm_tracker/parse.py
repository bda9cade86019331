"""Reading sacct output: bytes in, JobRecord / Rejected values out (no I/O, no clock).

Accepted inputs (auto-detected, see DESIGN.md and the public fixtures' MANIFEST.md):

* ``sacct --json`` of Slurm 21.08 to 25.11 and slurmrestd ``/slurmdb`` job responses;
* parsable output, ``-p`` (trailing delimiter) or ``-P``, with a header line, in any field
  order, extra fields allowed, the delimiter being ``|#|`` (the live query), ``|`` or a tab;
* headerless parsable output when the caller passes the field list.

Per-record problems become a ``Rejected`` (never an exception); only input that cannot be
read at all raises ``InputError``. State names never decide anything here.

This module is the reader's entry point (:func:`parse_sacct`, :func:`parse_live`, and the
streaming readers :func:`saved_stream`, :func:`live_file_stream`, :func:`live_stream`); the
rest of the reader is in:

* :mod:`slurm_tracker.parse_fields`: single values (job ids, durations, times, states, counts);
* :mod:`slurm_tracker.parse_tres`: the one TRES decoder, for the text and the JSON forms;
* :mod:`slurm_tracker.parse_framing`: layouts and record framing of parsable output;
* :mod:`slurm_tracker.parse_rows`: parsable records to JobRecords, the whole-input readers;
* :mod:`slurm_tracker.parse_json`: ``sacct --json``, read job by job
  (:mod:`slurm_tracker.parse_json_stream`: the document in blocks);
* :mod:`slurm_tracker.parse_steps`: records with their steps, as rows (the cost report);
* :mod:`slurm_tracker.parse_stream`: the streaming readers (RecordStream), in bounded memory,
  and :mod:`slurm_tracker.parse_live_stream`: the live query's output as a stream;
* :mod:`slurm_tracker.sacct_format`: the field names and delimiters (shared with sacct.py).

Their public names are re-exported here on purpose: callers (pipeline, costs, tests) import
them from ``slurm_tracker.parse``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timezone, tzinfo
from typing import Optional

from .models import ParseResult
from .parse_fields import (
    MAX_ELAPSED_S,
    JobId,
    parse_duration,
    parse_job_id,
    parse_state,
    parse_time,
)
from .parse_framing import Framed
from .parse_json import _parse_json
from .parse_live_stream import live_file_rows, live_file_stream, live_stream
from .parse_rows import _parse_parsable, parse_live
from .parse_steps import Row, live_rows, record_of_row, saved_rows
from .parse_stream import BLOCK_BYTES, Item, RecordStream, saved_stream
from .parse_tres import decode_tres, parse_tres, tres_from_json
from .sacct_format import FREE_TEXT_FIELDS, KNOWN_FIELDS, canonical_field

__all__ = [
    "BLOCK_BYTES",
    "FREE_TEXT_FIELDS",
    "KNOWN_FIELDS",
    "MAX_ELAPSED_S",
    "Framed",
    "Item",
    "JobId",
    "RecordStream",
    "Row",
    "canonical_field",
    "decode_tres",
    "live_file_rows",
    "live_file_stream",
    "live_rows",
    "live_stream",
    "parse_duration",
    "parse_job_id",
    "parse_live",
    "parse_sacct",
    "parse_state",
    "parse_time",
    "parse_tres",
    "record_of_row",
    "saved_rows",
    "saved_stream",
    "tres_from_json",
]


# --- entry point -----------------------------------------------------------------------------


def parse_sacct(
    data: bytes,
    *,
    cluster: str,
    fields: Optional[Sequence[str]] = None,
    tz: tzinfo = timezone.utc,
    source: str = "<input>",
) -> ParseResult:
    """Parse sacct output (JSON, or parsable with a header, or headerless with ``fields``).

    ``cluster`` is used when a record does not name its cluster; ``tz`` is the zone of naive
    times (sacct's local time); ``source`` names the input in errors. Raises InputError only
    when the input as a whole cannot be read.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return ParseResult(records=(), rejected=())
    if data.lstrip().startswith(b"{"):
        return _parse_json(data, cluster=cluster, source=source)
    if isinstance(fields, str):
        fields = fields.split(",")
    return _parse_parsable(data, cluster=cluster, fields=fields, tz=tz, source=source)
