"""Input: the sacct output a sync reads, a saved capture or one live sacct call.

Both are read as a stream (parse.RecordStream), block by block from a file, in bounded memory:
a saved capture from its file (standard input is spooled to a temporary file first, as it is
read twice), a live call's output from the temporary file it was spooled to as sacct printed
it (:func:`call_sacct`, the one place a sacct query is run, for syncs, backfills, reconcile
and the cost report), read strictly with the call's own delimiter and only once sacct has
exited successfully. :func:`duplicate_records` is the first pass over a stream: the runs
written more than once, found in bounded memory.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, BinaryIO, Optional
from zoneinfo import ZoneInfo

from slurm_tracker import sacct
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.errors import InputError, SacctUnavailable
from slurm_tracker.models import JobRecord, ParseResult, RunKey, Skipped
from slurm_tracker.parse import (
    RecordStream,
    live_file_stream,
    parse_live,
    parse_sacct,
    saved_stream,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """The sacct time window of a sync: jobs overlapping ``[start_at, end_at)``."""

    start_at: datetime
    end_at: datetime


def read_saved(path: str, stdin: BinaryIO) -> bytes:
    """The bytes of a saved sacct capture (``-`` reads standard input)."""
    if path == "-":
        return stdin.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: str, exc: OSError) -> InputError:
    return InputError(
        f"cannot read sacct file {path}: {exc.strerror or exc}; check the path and permissions"
    )


@dataclass(frozen=True)
class Input:
    """sacct output to process, and how to read it."""

    data: bytes
    source: str
    window: Optional[Window]  # None for a saved file: the high-water mark is left alone
    delimiter: Optional[str] = None  # the live query's: read strictly (parse.parse_live)
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class LiveOutput:
    """What one live sacct call printed, spooled to an anonymous temporary file (0600, gone
    when closed): ``opener`` opens it, once per pass."""

    opener: Callable[[], BinaryIO]
    size: int
    source: str
    delimiter: str
    fields: tuple[str, ...]


def call_sacct(
    config: Config,
    window: Window,
    environ: Mapping[str, str],
    *,
    with_job_name: bool,
    with_steps: bool = False,
) -> LiveOutput:
    """One sacct call for ``window``: the billing query (allocations only), or with
    ``with_steps`` the cost report's (allocations and their steps). Raises SacctUnavailable (a
    temporary failure) when sacct cannot be run, times out or exits non-zero.

    A fresh unpredictable delimiter every call, JobName only when ``with_job_name`` (and last),
    the allow-listed environment (see sacct.py). The output goes to a temporary file as it
    comes, so memory does not grow with it, and it is handed on only once sacct's exit status
    is known: nothing of a failed call is ever read.
    """
    delimiter = sacct.new_delimiter()
    if with_steps:
        fields = sacct.report_fields(with_job_name)
        build = sacct.build_report_command
        log.info("running sacct (with steps) for %s .. %s", window.start_at, window.end_at)
    else:
        fields = sacct.live_fields(with_job_name)
        build = sacct.build_command
        log.info("running sacct for %s .. %s", window.start_at, window.end_at)
    argv = build(
        config.sacct.path,
        window.start_at,
        window.end_at,
        config.sacct.extra_args,
        delimiter=delimiter,
        fields=fields,
        clusters=config.sacct.clusters,
    )
    spool = _spool_file()
    write = _spool_writer(spool)
    size = sacct.stream_sacct(
        argv, write, timeout_s=config.sacct.timeout_s, environ=sacct.sacct_environment(environ)
    )
    _flush(spool)
    return LiveOutput(_reopener(spool), size, f"sacct ({config.sacct.path})", delimiter, fields)


def _spool_file() -> BinaryIO:
    try:
        return tempfile.TemporaryFile()
    except OSError as exc:
        raise _spool_error(exc) from exc


def _spool_writer(spool: BinaryIO) -> Callable[[bytes], object]:
    def write(block: bytes) -> None:
        try:
            spool.write(block)
        except OSError as exc:
            raise _spool_error(exc) from exc

    return write


def _flush(spool: BinaryIO) -> None:
    try:
        spool.flush()  # the passes read it through their own descriptors
    except OSError as exc:
        raise _spool_error(exc) from exc


def _spool_error(exc: OSError) -> OSError:
    """An OSError saying where sacct's output was kept (a full disk is a temporary failure)."""
    where = f"{tempfile.gettempdir()} (the temporary file sacct's output is kept in)"
    return OSError(exc.errno, exc.strerror or str(exc), where)


def _reopener(spool: BinaryIO) -> Callable[[], BinaryIO]:
    """Opens ``spool`` from its start, with a position of its own (once per pass)."""

    def open_it() -> BinaryIO:
        return io.BufferedReader(_SpoolReader(spool), 1 << 16)

    return open_it


def read_live(config: Config, window: Window, environ: Mapping[str, str]) -> Input:
    """One sacct call for ``window`` (call_sacct), its output read whole: for the callers that
    hold a chunk's records anyway (backfill, reconcile). A sync streams it (open_input)."""
    output = call_sacct(config, window, environ, with_job_name=_with_job_name(config))
    with output.opener() as handle:
        data = handle.read()
    return Input(data, output.source, window, output.delimiter, output.fields)


def _with_job_name(config: Config) -> bool:
    return "job_name" in config.metadata_fields


def file_zone(cfg: SacctConfig) -> tzinfo:
    """The zone of naive timestamps in saved files (the config validated the name)."""
    if cfg.file_timezone.upper() == "UTC":
        return timezone.utc
    return ZoneInfo(cfg.file_timezone)


def gather(
    config: Config,
    window: Window,
    sacct_file: Optional[str],
    stdin: BinaryIO,
    environ: Mapping[str, str],
) -> Input:
    """The sacct output to process: a saved file, or one live call for ``window``."""
    if sacct_file is not None:
        data = read_saved(sacct_file, stdin)
        return Input(data, "stdin" if sacct_file == "-" else sacct_file, None)
    return read_live(config, window, environ)


def parse_input(config: Config, given: Input, fields: Optional[Sequence[str]]) -> ParseResult:
    """Records of ``given``: the live query's output strictly (output it cannot read is a
    temporary failure, SacctUnavailable), a saved file as detected."""
    if given.delimiter is not None:
        try:
            return parse_live(
                given.data,
                delimiter=given.delimiter,
                fields=given.fields,
                cluster=config.cluster,
                source=given.source,
            )
        except InputError as exc:
            raise _temporary(exc) from exc
    return parse_sacct(
        given.data,
        cluster=config.cluster,
        fields=fields,
        tz=file_zone(config.sacct),
        source=given.source,
    )


def _temporary(exc: InputError) -> SacctUnavailable:
    """Live output that cannot be read: a temporary failure (another program answered)."""
    return SacctUnavailable(f"{exc}; nothing was recorded or advanced, the next run tries again")


def open_input(
    config: Config,
    window: Window,
    sacct_file: Optional[str],
    fields: Optional[Sequence[str]],
    stdin: BinaryIO,
    environ: Mapping[str, str],
) -> tuple[RecordStream, Optional[Window]]:
    """The records to plan, as a stream: a saved file (read block by block; standard input is
    spooled to a temporary file first, as it is read twice), or one live sacct call for
    ``window`` (returned with it), its output spooled to a temporary file as it comes and read
    from there block by block, strictly, once sacct has exited successfully."""
    if sacct_file is None:
        output = call_sacct(config, window, environ, with_job_name=_with_job_name(config))
        try:
            stream = live_file_stream(
                output.opener,
                delimiter=output.delimiter,
                fields=output.fields,
                cluster=config.cluster,
                source=output.source,
            )
        except InputError as exc:
            raise _temporary(exc) from exc
        return stream, window
    source = "stdin" if sacct_file == "-" else sacct_file
    opener = _spooled(stdin) if sacct_file == "-" else _opener(sacct_file)
    stream = saved_stream(
        opener, cluster=config.cluster, fields=fields, tz=file_zone(config.sacct), source=source
    )
    return stream, None


def _opener(path: str) -> Callable[[], BinaryIO]:
    """Opens ``path`` (once per pass); InputError now when it cannot be read."""

    def open_it() -> BinaryIO:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise _unreadable(path, exc) from exc

    open_it().close()
    return open_it


def _spooled(stdin: BinaryIO) -> Callable[[], BinaryIO]:
    """Standard input copied to an anonymous temporary file, opened once per pass."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (kept open by the opener)
    shutil.copyfileobj(stdin, spool, 1 << 20)
    spool.flush()  # the passes read it through their own readers
    return _reopener(spool)


class _SpoolReader(io.RawIOBase):
    """Reads a spool file from its start at positions of its own (``os.pread``): passes over
    one spool never move each other, even when one is opened while another is read."""

    def __init__(self, spool: BinaryIO) -> None:
        super().__init__()
        self._spool = spool  # kept open (and alive) as long as a reader is
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._spool.fileno(), len(buffer), self._at)
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)


def chunks(start_at: datetime, end_at: datetime, chunk_s: int) -> list[Window]:
    """``[start_at, end_at)`` cut into windows of ``chunk_s`` seconds (the last may be shorter)."""
    windows = []
    current = start_at
    while current < end_at:
        step = min(end_at, current + timedelta(seconds=chunk_s))
        windows.append(Window(current, step))
        current = step
    return windows


#: Bits of the filter that finds job ids read more than once (16 MiB, whatever the input's
#: size: ~1e-5 false candidates per record at 1M records, ~0.8 % at 10M).
_SEEN_BITS = 1 << 27


def duplicate_records(stream: RecordStream) -> tuple[dict[RunKey, int], list[Skipped]]:
    """Runs read more than once, with the line of the record of each that is planned (the
    most advanced: final over running, then the longest elapsed, then the first), and the
    Skipped of the others, as planning.latest_records gives them.

    In bounded memory whatever the input's order: a first pass puts every record's
    (cluster, JobIDRaw) through a Bloom filter of fixed size; the ids it has seen before
    (every id of a duplicated run, and a few false candidates) are read in full by a second
    pass, which keeps a small tuple per candidate run. sacct prints one record per run unless
    a run was written twice (``--duplicates`` lists requeued runs, whose Submit differs, so
    they are different runs), so this usually finds nothing and the second pass is skipped.
    """
    bits = bytearray(_SEEN_BITS >> 3)
    mask = _SEEN_BITS - 1
    candidates: set[tuple[str, str]] = set()
    identity = stream.identity
    for framed in stream.framed():
        key = identity(framed)
        if key is None:
            continue
        h = hash(key)
        seen = True
        for index in (h & mask, (h >> 27) & mask, hash((h, 7)) & mask):
            byte, bit = index >> 3, 1 << (index & 7)
            if not bits[byte] & bit:
                bits[byte] |= bit
                seen = False
        if seen:
            candidates.add(key)
    del bits
    if not candidates:
        return {}, []
    # per candidate run: the kept record's (final, elapsed, line, job id), and how many were read
    best: dict[RunKey, tuple[tuple[bool, int, int, str], int]] = {}
    dropped: list[Skipped] = []
    for framed in stream.framed():
        if identity(framed) not in candidates:
            continue
        record = stream.read(framed)
        if not isinstance(record, JobRecord):
            continue
        run = record.run
        now = (record.final, record.elapsed_s, record.line, record.job_id)
        seen_as = best.get(run)
        if seen_as is None:
            best[run] = (now, 1)
            continue
        kept, read = seen_as
        keep, drop = (now, kept) if now[:2] > kept[:2] else (kept, now)
        best[run] = (keep, read + 1)
        dropped.append(
            Skipped(
                drop[3],
                f"duplicate record of this run (line {drop[2]}): line {keep[2]} is used",
                run,
            )
        )
    return {run: kept[2] for run, (kept, read) in best.items() if read > 1}, dropped
