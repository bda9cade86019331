"""The live sacct call, streamed (issue 10): its output goes to a temporary file as it comes and is
read from there block by block, so memory does not grow with it; every protection of the call
holds (allow-listed environment, random delimiter, timeout, stderr kept, exit status checked),
and nothing of a sacct that fails is ever committed."""

from __future__ import annotations

import errno
import hashlib
import io
import sys
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from slurm_tracker import inputs, parse, parse_stream, pipeline, sacct
from slurm_tracker.api import AllocationsClient
from slurm_tracker.config import Config, config_from_text
from slurm_tracker.errors import SacctUnavailable
from slurm_tracker.models import JobRecord, ParseResult, Rejected, RunKey
from slurm_tracker.parse import parse_live
from slurm_tracker.sacct_format import DELIMITER_RE
from slurm_tracker.state import State
from tests.fake_api import BASE, FakeApi, serving

UTC = timezone.utc
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
START = int((T0 - timedelta(hours=3)).timestamp())
ENVIRON = {"PATH": "/usr/bin:/bin", "PW_API_KEY": "pwt_secret.key", "SACCT_FORMAT": "JobID"}

#: A stand-in for sacct printing ``records`` billable runs in the fields and with the delimiter
#: the command line asks for, a line on stderr every ``stderr_every`` records, then doing
#: ``after`` and exiting with ``status``. Its pid goes to ``pid_file``; its environment's
#: variable names to ``env_file``.
FAKE = """#!{python}
import os, sys, time
open({pid_file!r}, "w").write(str(os.getpid()))
open({env_file!r}, "w").write(" ".join(sorted(os.environ)))
args = sys.argv[1:]
delimiter = next(a.split("=", 1)[1] for a in args if a.startswith("--delimiter="))
fields = next(a.split("=", 1)[1] for a in args if a.startswith("--format=")).split(",")
out, err = sys.stdout.buffer, sys.stderr.buffer
out.write((delimiter.join(fields) + delimiter + "\\n").encode())
for i in range(1, {records} + 1):
    start = {start} + i
    values = dict(
        Cluster="box", JobID=str(i), JobIDRaw=str(i), Account="physics", Partition="compute",
        User="alice", Group="alice", QOS="normal", Submit=str(start), Eligible=str(start),
        Start=str(start), End=str(start + 3600), ElapsedRaw="3600", State="COMPLETED",
        ExitCode="0:0", AllocTRES="cpu=2,node=1", NNodes="1", NodeList="node1",
        Reservation="", JobName="a name\\nwith | and " + delimiter[:3],
    )
    out.write((delimiter.join(values[f] for f in fields) + delimiter + "\\n").encode())
    if {stderr_every} and i % {stderr_every} == 0:
        err.write(("sacct: warning at record %d %s\\n" % (i, "." * 300)).encode())
out.flush()
{after}
sys.exit({status})
"""


def fake_sacct(
    tmp_path: Path,
    records: int,
    *,
    status: int = 0,
    after: str = "pass",
    stderr_every: int = 0,
) -> Path:
    path = tmp_path / "sacct"
    path.write_text(
        FAKE.format(
            python=sys.executable,
            pid_file=str(tmp_path / "sacct.pid"),
            env_file=str(tmp_path / "sacct.env"),
            records=records,
            start=START,
            stderr_every=stderr_every,
            after=after,
            status=status,
        )
    )
    path.chmod(0o755)
    return path


def config_for(program: Path, *, timeout: str = "30s", job_name: bool = True) -> Config:
    metadata = "metadata: {fields: [job_name]}\n" if job_name else ""
    return config_from_text(
        f"cluster: box\napi: {{organization: org}}\nsacct: {{path: '{program}', lag: 5m, "
        f"timeout: {timeout}}}\naccounts: {{map: {{physics: physics-2026}}}}\n"
        f"partitions: {{map: {{compute: SLURM_CPU_HOUR}}}}\n{metadata}",
        "test",
    )


WINDOW = inputs.Window(T0 - timedelta(days=1), T0 - timedelta(minutes=5))


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _dead_soon(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# --- memory: flat in the size of sacct's output ------------------------------------------------


def peak_of_a_live_read(tmp_path: Path, records: int) -> tuple[int, int, int]:
    """(records framed, bytes sacct printed, tracemalloc's peak) of opening a live input and
    framing all of it, as a sync's first pass does."""
    tmp_path.mkdir()
    program = fake_sacct(tmp_path, records)
    config = config_for(program)
    tracemalloc.start()
    try:
        stream, window = inputs.open_input(config, WINDOW, None, None, io.BytesIO(), ENVIRON)
        framed = sum(1 for _ in stream.framed())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert window == WINDOW
    output = inputs.call_sacct(config, WINDOW, ENVIRON, with_job_name=True)
    return framed, output.size, peak


def test_the_live_output_is_read_in_flat_memory(tmp_path: Path) -> None:
    small, small_size, small_peak = peak_of_a_live_read(tmp_path / "small", 2_000)
    large, large_size, large_peak = peak_of_a_live_read(tmp_path / "large", 50_000)
    assert (small, large) == (2_000, 50_000)
    assert large_size > 25 * small_size > 25_000_000
    # the blocks read (1 MB) and a record, whatever the output's size
    assert large_peak < small_peak + 3_000_000, (small_peak, large_peak)
    assert large_peak < large_size / 5, (large_size, large_peak)


def test_stream_sacct_hands_the_output_on_block_by_block(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 20_000)
    argv = sacct.build_command(
        str(program), WINDOW.start_at, WINDOW.end_at, delimiter=sacct.new_delimiter()
    )
    blocks: list[int] = []
    size = sacct.stream_sacct(
        argv, lambda block: blocks.append(len(block)), timeout_s=30, environ={"PATH": "/bin"}
    )
    assert size == sum(blocks) > 4_000_000
    assert len(blocks) > 4 and max(blocks) <= 1 << 20


# --- the same records as the whole output read strictly ----------------------------------------


@pytest.mark.parametrize("block", [1, 7, 97, 4096, 1 << 20])
def test_the_spooled_output_reads_as_parse_live_reads_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    program = fake_sacct(tmp_path, 50 if block < 97 else 600)
    config = config_for(program)
    output = inputs.call_sacct(config, WINDOW, ENVIRON, with_job_name=True)
    with output.opener() as handle:
        whole = handle.read()
    damaged = whole + b"box" + output.delimiter.encode() + b"9" + output.delimiter.encode()
    damaged += b"\n" + output.delimiter.encode() + b"\n  \n"  # a record cut short, then blanks
    monkeypatch.setattr(parse_stream, "BLOCK_BYTES", block)
    for data in (whole, damaged):
        stream = parse.live_file_stream(
            lambda data=data: io.BytesIO(data),  # type: ignore[misc]
            delimiter=output.delimiter,
            fields=output.fields,
            cluster="box",
            source="sacct",
        )
        found = list(stream.items())
        expected = parse_live(
            data, delimiter=output.delimiter, fields=output.fields, cluster="box", source="sacct"
        )
        assert (
            ParseResult(
                records=tuple(i for i in found if isinstance(i, JobRecord)),
                rejected=tuple(i for i in found if isinstance(i, Rejected)),
                steps_ignored=sum(i is None for i in found),
            )
            == expected
        )
        assert len(expected.records) >= 50
    assert expected.rejected  # the damaged output's


def test_the_call_keeps_its_protections(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 3)
    output = inputs.call_sacct(config_for(program), WINDOW, ENVIRON, with_job_name=False)
    assert DELIMITER_RE.fullmatch(output.delimiter)
    assert output.fields == sacct.live_fields(False)  # no JobName unless asked for
    names = set((tmp_path / "sacct.env").read_text().split()) - {"LC_CTYPE"}  # Python's own
    assert names == {"PATH", "SLURM_TIME_FORMAT", "TZ"}  # the allow-list: no key, no SACCT_FORMAT
    again = inputs.call_sacct(config_for(program), WINDOW, ENVIRON, with_job_name=True)
    assert again.delimiter != output.delimiter
    assert again.fields[-1] == "JobName"


def test_a_wrong_header_is_a_temporary_failure(tmp_path: Path) -> None:
    program = tmp_path / "sacct"
    program.write_text("#!/bin/sh\necho 'JobID|State|'\necho '1|COMPLETED|'\n")
    program.chmod(0o755)
    with pytest.raises(SacctUnavailable, match="header of the query"):
        inputs.open_input(config_for(program), WINDOW, None, None, io.BytesIO(), ENVIRON)


# --- a sacct that fails commits nothing ---------------------------------------------------------


def sync(tmp_path: Path, config: Config) -> pipeline.SyncResult:
    client = AllocationsClient(BASE, "org", "pwt_test.secret", sleep=lambda _s: None)
    request = pipeline.SyncRequest(T0, None, None, io.BytesIO(), ENVIRON)
    with serving(FakeApi()), State.open(tmp_path / "state.db") as store:
        return pipeline.sync_once(config, store, client, None, request, clock=lambda: T0)


def nothing_committed(tmp_path: Path) -> None:
    runs = [RunKey("box", str(i), datetime.fromtimestamp(START + i, UTC)) for i in range(1, 6)]
    with State.open(tmp_path / "state.db", readonly=True) as store:
        assert store.high_water_at() is None
        assert store.floor_at() is None
        assert store.outbox() == []
        assert store.reported(runs) == {}
        assert not any(store.counts().values())


@pytest.mark.parametrize("records", [5, 30_000])  # within the pipe's buffer, and well past it
def test_a_sacct_that_fails_after_printing_its_output_commits_nothing(
    tmp_path: Path, records: int
) -> None:
    program = fake_sacct(tmp_path, records, status=1, stderr_every=1000)
    with pytest.raises(SacctUnavailable) as caught:
        sync(tmp_path, config_for(program))
    message = str(caught.value)
    assert "failed with exit status 1" in message
    assert "nothing was recorded or advanced" in message
    nothing_committed(tmp_path)
    # the same output from a sacct that succeeds is billed
    ok = fake_sacct(tmp_path, 5)
    result = sync(tmp_path, config_for(ok))
    assert result.new_events == 5
    with State.open(tmp_path / "state.db", readonly=True) as store:
        assert store.high_water_at() == T0 - timedelta(minutes=5)


def test_a_sacct_killed_after_printing_commits_nothing(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 3000, after="import signal; os.kill(os.getpid(), 9)")
    with pytest.raises(SacctUnavailable, match="killed by signal 9"):
        sync(tmp_path, config_for(program))
    nothing_committed(tmp_path)


def test_a_sacct_that_hangs_after_printing_is_killed_at_the_timeout(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 20_000, after="sys.stderr.write('stuck\\n'); time.sleep(60)")
    began = time.monotonic()
    with pytest.raises(SacctUnavailable) as caught:
        sync(tmp_path, config_for(program, timeout="1s"))
    assert time.monotonic() - began < 15
    message = str(caught.value)
    assert "timed out after 1 s and was killed" in message
    assert "| stuck" in message  # its stderr
    assert _dead_soon(tmp_path / "sacct.pid")
    nothing_committed(tmp_path)


def test_a_sacct_that_never_closes_its_output_is_killed_at_the_timeout(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 10, after="time.sleep(60)")
    program.write_text(program.read_text().replace("out.flush()", "out.flush(); time.sleep(60)"))
    with pytest.raises(SacctUnavailable, match="timed out after 1 s"):
        inputs.call_sacct(config_for(program, timeout="1s"), WINDOW, ENVIRON, with_job_name=True)
    assert _dead_soon(tmp_path / "sacct.pid")


# --- stderr: kept in a file, no deadlock ---------------------------------------------------------


def test_large_stderr_and_stdout_together_do_not_block(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 60_000, stderr_every=2)  # ~9 MB on each
    argv = sacct.build_command(
        str(program), WINDOW.start_at, WINDOW.end_at, delimiter=sacct.new_delimiter()
    )
    digest = hashlib.sha256()
    began = time.monotonic()
    size = sacct.stream_sacct(argv, digest.update, timeout_s=60, environ={"PATH": "/bin"})
    assert time.monotonic() - began < 30
    assert size > 9_000_000
    assert (
        digest.digest()
        == hashlib.sha256(sacct.run_sacct(argv, timeout_s=60, environ={"PATH": "/bin"})).digest()
    )


def test_only_the_last_lines_of_a_large_stderr_are_shown(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 60_000, stderr_every=2, status=3)
    argv = [str(program), "--delimiter=|~x~|", "--format=JobID"]
    with pytest.raises(SacctUnavailable) as caught:
        sacct.stream_sacct(argv, lambda _b: None, timeout_s=60, environ={"PATH": "/bin"})
    message = str(caught.value)
    assert "failed with exit status 3" in message
    assert "warning at record 60000 " in message
    assert "warning at record 59982 " in message  # the last 10 lines
    assert "warning at record 59980 " not in message


# --- when the output cannot be kept -------------------------------------------------------------


def test_a_reader_that_fails_kills_sacct(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 10**7)  # would print for minutes

    def full(_block: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        sacct.stream_sacct(
            [str(program), "--delimiter=|~x~|", "--format=JobID"],
            full,
            timeout_s=60,
            environ={"PATH": "/bin"},
        )
    assert _dead_soon(tmp_path / "sacct.pid")


class _FullDisk(io.BytesIO):
    def write(self, _block: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_spooling_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = fake_sacct(tmp_path, 10)
    monkeypatch.setattr(inputs, "_spool_file", _FullDisk)
    with pytest.raises(OSError) as caught:
        inputs.call_sacct(config_for(program), WINDOW, ENVIRON, with_job_name=True)
    assert caught.value.errno == errno.ENOSPC  # a temporary failure (exit 75) for the CLI
    assert "temporary file sacct's output is kept in" in str(caught.value.filename)


def test_read_live_still_gives_the_whole_output(tmp_path: Path) -> None:
    program = fake_sacct(tmp_path, 40)
    given = inputs.read_live(config_for(program), WINDOW, ENVIRON)
    parsed = inputs.parse_input(config_for(program), given, None)
    assert len(parsed.records) == 40
    assert given.window == WINDOW


def test_passes_over_the_spooled_output_do_not_move_each_other(tmp_path: Path) -> None:
    output = inputs.call_sacct(
        config_for(fake_sacct(tmp_path, 300)), WINDOW, ENVIRON, with_job_name=True
    )
    with output.opener() as first, output.opener() as second:
        start = first.read(1000)
        whole = second.read()
        rest = first.read()
    assert start + rest == whole
    assert len(whole) == output.size > 1000
