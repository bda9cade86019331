"""Renders results for people (tables) and programs (JSON, CSV). Pure: returns text and dicts,
or writes to a stream what is too long to hold (a dry run's plan, batch by batch).

This module is the entry point; the renderers live in:

* :mod:`slurm_tracker.report_format`: what every output shares: :func:`printable` text,
  aligned text tables (:func:`table`), CSV of JSON-like rows (:func:`csv_text`,
  :func:`write_csv`), JSON numbers;
* :mod:`slurm_tracker.report_plan_json`: the JSON of a plan, whole (:func:`plan_json`) or
  streamed (:func:`write_plan_json`), and of its events, totals and rejected records;
* :mod:`slurm_tracker.report_plan`: the table of a plan (:class:`PlanSummary`,
  :func:`summary_text`, :func:`write_plan_table`) and the CSV of its events
  (:func:`write_plan_csv`), both in bounded memory;
* :mod:`slurm_tracker.report_spool`: the temporary files those streaming writers keep their
  lists in;
* :mod:`slurm_tracker.report_sync`: a live sync's summary and ``status``;
* :mod:`slurm_tracker.report_rows`: the rows of ``outbox list``, ``quarantine list`` and
  ``catalog show``.

Their names are re-exported here on purpose (``__all__``): the CLI, correcting.py, reconcile
and the tests use them as ``report.X``.
"""

from __future__ import annotations

from slurm_tracker.report_format import (
    TextSink,
    csv_text,
    flat_row,
    fmt,
    number,
    printable,
    table,
    table_lines,
    write_csv,
)
from slurm_tracker.report_plan import (
    LIST_LIMIT,
    PlanSummary,
    plan_text,
    summarize,
    summary_lines,
    summary_text,
    write_plan_csv,
    write_plan_table,
)
from slurm_tracker.report_plan_json import (
    _event_text,
    _json_value,
    event_json,
    plan_json,
    rejected_json,
    total_json,
    write_plan_json,
)
from slurm_tracker.report_rows import (
    outbox_json,
    outbox_text,
    quarantine_json,
    quarantine_text,
    rates_json,
    rates_text,
)
from slurm_tracker.report_sync import (
    status_info,
    status_text,
    sync_json,
    sync_summary,
    sync_text,
)

__all__ = [
    "LIST_LIMIT",
    "PlanSummary",
    "TextSink",
    "_event_text",
    "_json_value",
    "csv_text",
    "event_json",
    "flat_row",
    "fmt",
    "number",
    "outbox_json",
    "outbox_text",
    "plan_json",
    "plan_text",
    "printable",
    "quarantine_json",
    "quarantine_text",
    "rates_json",
    "rates_text",
    "rejected_json",
    "status_info",
    "status_text",
    "summarize",
    "summary_lines",
    "summary_text",
    "sync_json",
    "sync_summary",
    "sync_text",
    "table",
    "table_lines",
    "total_json",
    "write_csv",
    "write_plan_csv",
    "write_plan_json",
    "write_plan_table",
]
