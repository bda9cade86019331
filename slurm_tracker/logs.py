"""Where log records go, and how they look.

- stderr, always: plain lines ``slurm-tracker: warning: ...``. Under systemd (stderr is the
  journal stream named by ``$JOURNAL_STREAM``) each line starts with the syslog priority,
  ``<4>``, so that ``journalctl -p warning`` finds warnings; nothing else changes.
- ``--log-format json`` (or ``$SLURM_TRACKER_LOG_FORMAT=json``): one JSON object per line
  (time, level, priority, logger, message and the record's structured fields), for a log
  shipper.
- ``--syslog`` (or ``$SLURM_TRACKER_SYSLOG=1``): also to the local syslog (``/dev/log``, ident
  ``slurm-tracker``, facility daemon) at INFO, whatever -v/-q say for stderr: cron keeps its
  mail for errors (-q) while syslog gets the summary line of every sync.

Every record is one line: newlines and control characters in a message (job names, API
answers) are escaped, so that no text can forge or split a log line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Optional, TextIO

ROOT = "slurm_tracker"
SUMMARY = "slurm_tracker.summary"  # one line per sync, backfill and failure
FORMATS = ("text", "json")
SYSLOG_SOCKET = "/dev/log"

#: syslog priorities (RFC 5424) of the logging levels.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (5, notice, for levels between INFO and
    WARNING)."""
    if levelno in _PRIORITY:
        return _PRIORITY[levelno]
    return 5 if logging.INFO < levelno < logging.WARNING else (7 if levelno < logging.INFO else 3)


def one_line(text: str) -> str:
    """``text`` on one line: control characters (newlines included) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is connected to the journal: ``$JOURNAL_STREAM`` is ``DEV:INODE`` of
    the stream systemd connected (a child with redirected stderr must not use prefixes)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """Structured fields a caller attached with ``extra={"fields": {...}}``."""
    value = getattr(record, "fields", None)
    return dict(value) if isinstance(value, Mapping) else {}


class TextFormatter(logging.Formatter):
    """``slurm-tracker: warning: message``, with ``<N>`` in front for the journal."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = one_line(record.getMessage())
        if record.exc_info and record.levelno <= logging.DEBUG:
            text += " | " + one_line(self.formatException(record.exc_info))
        line = f"slurm-tracker: {record.levelname.lower()}: {text}"
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (json.dumps escapes every control character)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = fields(record)
        if extra:
            body["fields"] = extra
        if record.exc_info and record.levelno <= logging.DEBUG:
            body["traceback"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class SyslogFormatter(logging.Formatter):
    """The message for syslog (the handler adds priority and facility)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"slurm-tracker[{os.getpid()}]: {record.levelname.lower()}: " + one_line(
            record.getMessage()
        )


def stderr_level(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.ERROR
    return (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]


def setup(
    verbose: int,
    quiet: bool,
    log_format: Optional[str] = None,
    syslog: bool = False,
    environ: Mapping[str, str] = os.environ,
    stream: Optional[TextIO] = None,
) -> None:
    """Configure the package's logger for one command (called once per command)."""
    stream = stream if stream is not None else sys.stderr
    log_format = (log_format or environ.get("SLURM_TRACKER_LOG_FORMAT") or "text").lower()
    if log_format not in FORMATS:
        log_format = "text"
    level = stderr_level(verbose, quiet)
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        # a log shipper wants the summary of every sync, even without -v (not with -q)
        handler.addFilter(_AtLeast(level, logging.ERROR if quiet else logging.INFO))
    else:
        handler.setFormatter(TextFormatter(under_journald(stream, environ)))
        handler.addFilter(_AtLeast(level, level))
    handlers: list[logging.Handler] = [handler]
    wants_syslog = syslog or environ.get("SLURM_TRACKER_SYSLOG", "") not in ("", "0")
    if wants_syslog:
        to_syslog = _syslog_handler(min(level, logging.INFO))
        if to_syslog is not None:
            handlers.append(to_syslog)
    root = logging.getLogger(ROOT)
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(min(level, logging.INFO))
    root.propagate = False
    if wants_syslog and len(handlers) == 1:
        root.warning("no local syslog at %s: logging to stderr only", SYSLOG_SOCKET)


class _AtLeast(logging.Filter):
    """Records at ``level`` or above; summary lines at ``summary_level`` or above."""

    def __init__(self, level: int, summary_level: int) -> None:
        super().__init__()
        self.level = level
        self.summary_level = summary_level

    def filter(self, record: logging.LogRecord) -> bool:
        floor = self.summary_level if record.name == SUMMARY else self.level
        return record.levelno >= floor


def error_line(message: str, stream: Optional[TextIO] = None) -> str:
    """An error message for stderr; under systemd every line of it carries the journal's
    priority prefix (a config error lists its problems one per line)."""
    stream = stream if stream is not None else sys.stderr
    text = f"slurm-tracker: error: {message}"
    if not under_journald(stream, os.environ):
        return text
    return "\n".join(f"<3>{line}" for line in text.split("\n"))


def failure(message: str, exit_code: int, stream: Optional[TextIO] = None) -> None:
    """The message of a command that fails with ``exit_code``: on stderr as an error line (a
    JSON object with --log-format json), and to syslog when it is on."""
    stream = stream if stream is not None else sys.stderr
    record = logging.getLogger(SUMMARY).makeRecord(
        SUMMARY,
        logging.ERROR,
        "",
        0,
        "%s",
        (message,),
        None,
        extra={"fields": {"outcome": "failed", "exitCode": exit_code}},
    )
    root = logging.getLogger(ROOT)
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(
            handler.formatter, JsonFormatter
        ):
            handler.handle(record)
            continue
        if isinstance(handler, logging.handlers.SysLogHandler):
            handler.handle(record)
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        print(error_line(message, stream), file=stream, flush=True)


class _Syslog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """A syslog that went away loses its copy of the line, nothing else (no traceback)."""


def _syslog_handler(level: int) -> Optional[logging.Handler]:
    try:
        if not stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            return None
        handler = _Syslog(address=SYSLOG_SOCKET, facility=_Syslog.LOG_DAEMON)
    except OSError:
        return None
    handler.setLevel(level)
    handler.setFormatter(SyslogFormatter())
    return handler


def summary(level: int, message: str, values: Mapping[str, Any]) -> None:
    """The one summary line of a sync or backfill (fields kept structured for JSON logs)."""
    logging.getLogger(SUMMARY).log(level, message, extra={"fields": dict(values)})
