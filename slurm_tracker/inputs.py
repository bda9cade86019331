"""Input: the sacct output a sync reads, a saved capture or one live sacct call.

A saved capture is read as a stream (parse.RecordStream), block by block from its file
(standard input is spooled to a temporary file first, as it is read twice); a live call's
output is held whole and read strictly with the call's own delimiter. :func:`duplicate_records`
is the first pass over a stream: the runs written more than once, found in bounded memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import BinaryIO, Optional, TypeVar
from zoneinfo import ZoneInfo

from slurm_tracker import sacct
from slurm_tracker.config import Config, SacctConfig
from slurm_tracker.errors import InputError, SacctUnavailable
from slurm_tracker.models import JobRecord, ParseResult, RunKey, Skipped
from slurm_tracker.parse import RecordStream, live_stream, parse_live, parse_sacct, saved_stream

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


def read_live(config: Config, window: Window, environ: Mapping[str, str]) -> Input:
    """One sacct call for ``window`` (raises SacctUnavailable, a temporary failure).

    A fresh unpredictable delimiter every call, and JobName only when the config sends job
    names as metadata (see sacct.py).
    """
    delimiter = sacct.new_delimiter()
    fields = sacct.live_fields("job_name" in config.metadata_fields)
    argv = sacct.build_command(
        config.sacct.path,
        window.start_at,
        window.end_at,
        config.sacct.extra_args,
        delimiter=delimiter,
        fields=fields,
        clusters=config.sacct.clusters,
    )
    log.info("running sacct for %s .. %s", window.start_at, window.end_at)
    data = sacct.run_sacct(
        argv, timeout_s=config.sacct.timeout_s, environ=sacct.sacct_environment(environ)
    )
    return Input(data, f"sacct ({config.sacct.path})", window, delimiter, fields)


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
    """Records of ``given``: the live query's output strictly, a saved file as detected."""
    if given.delimiter is not None:
        return _strictly(parse_live, config, given, given.delimiter)
    return parse_sacct(
        given.data,
        cluster=config.cluster,
        fields=fields,
        tz=file_zone(config.sacct),
        source=given.source,
    )


_Read = TypeVar("_Read")


def _strictly(read: Callable[..., _Read], config: Config, given: Input, delimiter: str) -> _Read:
    """The live query's output read strictly by ``read`` (parse_live, live_stream): output it
    cannot read is a temporary failure (SacctUnavailable)."""
    try:
        return read(
            given.data,
            delimiter=delimiter,
            fields=given.fields,
            cluster=config.cluster,
            source=given.source,
        )
    except InputError as exc:
        raise SacctUnavailable(
            f"{exc}; nothing was recorded or advanced, the next run tries again"
        ) from exc


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
    ``window`` (returned with it)."""
    if sacct_file is None:
        given = read_live(config, window, environ)
        assert given.delimiter is not None
        return _strictly(live_stream, config, given, given.delimiter), window
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
    spool.flush()  # the passes read it through their own descriptors

    def open_it() -> BinaryIO:
        handle = os.fdopen(os.dup(spool.fileno()), "rb")
        handle.seek(0)
        return handle

    return open_it


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
