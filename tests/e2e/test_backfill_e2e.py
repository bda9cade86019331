"""Backfill on the real box (issue 11): killed mid-way, run again, exact, no chunk re-read.

Six jobs of this test end a few seconds apart. A backfill over their period in 8-second
chunks (a pause of 3 s between sacct calls) is SIGKILLed once its second chunk is reported;
the same command then resumes: it says so, reads only the chunks the first one had not
committed (at most the one in flight when it was killed is read twice), and what the emulator
accepted equals slurmdbd's independent final accounting of the jobs, exactly, with no event
key twice. Every sacct call goes through a wrapper that logs its window.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.e2e import cluster
from tests.e2e.agent import (
    Agent,
    Jobs,
    check_billing,
    kill,
    mine,
    rfc3339,
    seconds_ago,
    utc_now,
)
from tests.emulator import Emulator

pytestmark = pytest.mark.usefixtures("slurm_box")

CHUNK_S = 8


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    mine = Jobs()
    yield mine
    mine.close()


def sacct_wrapper(directory: Path) -> tuple[Path, Path]:
    """A sacct that logs each call's --starttime and --endtime, then runs the real one."""
    real = shutil.which("sacct")
    assert real, "sacct is not on PATH"
    log = directory / "sacct-calls.log"
    wrapper = directory / "sacct-logged"
    wrapper.write_text(
        "#!/bin/sh\n"
        'start=""; end=""; prev=""\n'
        'for a in "$@"; do\n'
        '  [ "$prev" = "--starttime" ] && start="$a"\n'
        '  [ "$prev" = "--endtime" ] && end="$a"\n'
        '  prev="$a"\n'
        "done\n"
        f'echo "$start $end" >> "{log}"\n'
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper, log


def windows(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split()) for line in log.read_text().splitlines()]  # type: ignore[misc]


def test_a_killed_backfill_resumes_and_bills_exactly(tmp_path: Path, jobs: Jobs) -> None:
    started = seconds_ago(2)
    for n in range(6):
        jobs.submit(f"history-{n}", "-c", "2", account="physics", wrap="sleep 2")
        time.sleep(6)
    jobs.wait_done()
    end = utc_now() - timedelta(seconds=2)
    with Emulator() as api:
        agent = Agent(tmp_path, api.base_url, started)
        wrapper, log = sacct_wrapper(tmp_path)
        text = agent.config.read_text()
        assert "\nsacct:\n" in text
        agent.config.write_text(
            text.replace("\nsacct:\n", f"\nsacct:\n  path: {wrapper}\n  backfill_pause: 3s\n")
        )
        args = ("--start", rfc3339(started), "--end", rfc3339(end), "--chunk", f"{CHUNK_S}s")
        total = len(list(_chunks(started, end)))
        assert total >= 4, f"only {total} chunks: the jobs ran too fast"

        first = agent.start("backfill", *args)
        assert first.stderr is not None
        seen = []
        for line in first.stderr:
            seen.append(line)
            if line.startswith(f"backfill chunk 2/{total} "):
                break
        else:
            raise AssertionError("the backfill ended before its second chunk:\n" + "".join(seen))
        killed = kill(first)
        assert killed.returncode == -9, str(killed)
        read_first = windows(log)
        assert 2 <= len(read_first) < total

        second = agent.run("backfill", *args, "--output", "json")
        assert "resuming the backfill from" in second.stderr, str(second)
        read_second = windows(log)[len(read_first) :]

        # every chunk read, the ones committed before the kill not again: at most the chunk
        # in flight when the agent was killed is read twice
        assert set(read_first) | set(read_second) == set(_chunks(started, end))
        again = set(read_first) & set(read_second)
        assert again <= {read_first[-1]}, f"chunks read twice: {sorted(again)}"
        assert read_second[0] in (read_first[-1], _next(read_first[-1]))

        truth = cluster.truth(jobs.all())
        assert all(run.final for run in truth.values())
        billing = check_billing(api.events(), truth)
        assert sum(billing.totals.values()) > 0
        # the resumed backfill finished: a third one reads every chunk again and bills nothing
        # more of these jobs (other tests' jobs still running on the box may bill more)
        ours = len(mine(api.events(), truth))
        third = agent.run("backfill", *args, "--output", "json")
        assert "resuming" not in third.stderr
        assert len(windows(log)) == len(read_first) + len(read_second) + total
        assert len(mine(api.events(), truth)) == ours
        check_billing(api.events(), truth)


def _chunks(started: datetime, end: datetime) -> Iterator[tuple[str, str]]:
    current = started
    while current < end:
        step = min(end, current + timedelta(seconds=CHUNK_S))
        yield (_sacct_time(current), _sacct_time(step))
        current = step


def _sacct_time(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _next(window: tuple[str, str]) -> tuple[str, str]:
    start = datetime.strptime(window[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return (window[1], _sacct_time(start + timedelta(seconds=CHUNK_S)))
