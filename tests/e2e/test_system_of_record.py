"""The Allocations API as the system of record (issue 9, "Tests must show"), on the real box.

The local state file is only a cache of what the API holds. Each scenario here takes it away
or doubles it, as an operator would, while jobs run and end, and is then judged like the other
scenarios (``agent.check_billing`` against the independent final sacct: per run, SKU and
allocation, exact, no event key accepted twice):

1. the state file (with its -wal, -shm and lock) is deleted between two syncs: the next sync
   learns from the API what is already billed and bills only the rest;
2. an older copy of the state file (taken between syncs, the agent stopped) is put back: the
   events the copy does not know are the agent's own (same host, same path) and are adopted;
3. a second agent (its own state file) on the same cluster refuses to bill (exit 5) and sends
   nothing; with ``--take-over`` it bills only what the first one left, and the first one then
   refuses in its turn;
4. going live with ``sacct.first_sync_start`` = now (absolute), or a short look-back (the
   floor is then the first window's start, stored in the state file), while jobs run and end:
   no window starts before the floor, a run that ended before it is not billed, a run across
   it is billed from the floor on (README, "Security and bad input": "runs across it are
   billed from it on"), later runs exactly;
5. ``state rebuild --from-api`` after a lost state file: the rebuilt state knows what is
   billed, and the syncs after it bill only the rest.

Every event's metadata names its agent (``<hostname>/<10 hex chars>``): the same state path on
the same host is the same agent, another state file is another one.

The state file is only ever removed or replaced between two syncs (no agent running), as a
restore from backup or an ``rm`` by an operator would be.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import cluster
from tests.e2e.agent import (
    EXIT_OK,
    EXIT_TEMPFAIL,
    TOLERANCE,
    Agent,
    Done,
    Jobs,
    check_billing,
    duplicate_keys,
    mine,
    rfc3339,
    run_of,
    seconds_ago,
    utc_now,
)
from tests.emulator import Emulator, StoredEvent

EXIT_OTHER_AGENT = 5
AGENT_ID = re.compile(rf"{re.escape(socket.gethostname())}/[0-9a-f]{{10}}")
SACCT_RETRY_S = 90
SYNC_PERIOD_S = 2.5  # "cron" in these scenarios: more than the 2 s reporting interval


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator() as server:
        yield server


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    mine_ = Jobs()
    yield mine_
    mine_.close()


@pytest.fixture
def started_at() -> datetime:
    """Shortly before the test's first job: the first sync starts here (no old history)."""
    return seconds_ago(5)


# -- helpers ---------------------------------------------------------------------------------


def agent_in(workdir: Path, emulator: Emulator, first_sync_start_at: datetime) -> Agent:
    workdir.mkdir(parents=True, exist_ok=True)
    return Agent(workdir, emulator.base_url, first_sync_start_at)


def remove_state(agent: Agent) -> None:
    """Delete the state file and everything beside it (-wal, -shm, lock), as ``rm`` would."""
    folder = agent.state.parent
    assert agent.state.exists(), f"no state file to remove at {agent.state}"
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()
    assert not agent.state.exists()


def restore_state(agent: Agent, copy: Mapping[str, bytes]) -> None:
    """Put back a copy of the state directory's files (``Agent.state_files``), the agent
    stopped: the current files go, the copy's come back 0600."""
    remove_state(agent)
    for name, data in copy.items():
        path = agent.state.parent / name
        path.write_bytes(data)
        os.chmod(path, 0o600)


def writes_since(emulator: Emulator, since: int) -> list[str]:
    """The POST and DELETE requests the emulator received since request number ``since``."""
    return [
        f"{r['method']} {r.get('path', '')}"
        for r in emulator.requests()[since:]
        if r["method"] in ("POST", "DELETE", "PUT", "PATCH")
    ]


def overlaps(events: Iterable[StoredEvent]) -> list[str]:
    """Per run and SKU, stretches ``[elapsedFrom, elapsedTo)`` accepted more than once.

    Holds for every event of the test's emulator (only this test's agents post to it), also
    while runs are still going, when ``check_billing`` cannot judge yet.
    """
    pieces: dict[tuple[Any, str], list[tuple[int, int, str]]] = defaultdict(list)
    for event in events:
        meta = event.metadata
        piece = (int(meta["elapsedFrom"]), int(meta["elapsedTo"]), str(event.event_key))
        pieces[(run_of(event), event.sku)].append(piece)
    found = []
    for (run, sku), stretches in sorted(pieces.items()):
        stretches.sort()
        for (_, end_a, key_a), (start_b, _, key_b) in zip(stretches, stretches[1:]):
            if start_b < end_a:
                found.append(f"{run} {sku}: {key_a} and {key_b} overlap")
    return found


def assert_billed_once(emulator: Emulator, when: str) -> None:
    """No key accepted twice and no stretch billed twice, so far."""
    events = emulator.events()
    dups = duplicate_keys(events)
    assert not dups, f"{when}: event keys accepted twice: {dups}"
    both = overlaps(events)
    assert not both, f"{when}: stretches billed twice:\n  " + "\n  ".join(both)


def agents_of(events: Iterable[StoredEvent]) -> set[str]:
    return {str(e.metadata.get("agent")) for e in events}


def own_events(emulator: Emulator, job_ids: Sequence[str]) -> list[StoredEvent]:
    return mine(emulator.events(), cluster.truth(job_ids))


def sync(agent: Agent, *args: str, expect: int = EXIT_OK) -> Done:
    """One sync that must exit ``expect``; a temporary sacct failure (slurmdbd restarted by
    another test on the shared box) changes nothing, and the sync is simply run again, as cron
    would, for up to SACCT_RETRY_S."""
    deadline = time.monotonic() + SACCT_RETRY_S
    while True:
        done = agent.sync(*args, expect={expect, EXIT_TEMPFAIL})
        if done.returncode == expect:
            return done
        assert "sacct failed" in done.stderr, f"expected exit {expect}: {done}"
        assert time.monotonic() < deadline, f"sacct kept failing for {SACCT_RETRY_S}s: {done}"
        time.sleep(2)


def sync_ok(agent: Agent, *args: str) -> dict[str, Any]:
    result = sync(agent, *args).json()
    assert result["outcome"] == "ok", result
    return dict(result)


def times_of(job_ids: Sequence[str]) -> dict[cluster.RunId, tuple[int, int]]:
    """(Start, End) as epoch seconds of every run of these jobs (End 0 while unknown)."""
    fields = ("Cluster", "JobIDRaw", "Submit", "Start", "End")
    out = cluster.run(
        "sacct",
        "--allusers",
        "--allocations",
        "--duplicates",
        "--noheader",
        "--parsable2",
        f"--format={','.join(fields)}",
        f"--jobs={','.join(job_ids)}",
    ).stdout
    found = {}
    for line in out.splitlines():
        name, raw, submit, start, end = line.split("|")
        found[(name, raw, int(submit))] = (
            int(start) if start.isdigit() else 0,
            int(end) if end.isdigit() else 0,
        )
    return found


# -- 1. a deleted state file -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_deleted_state_file_bills_nothing_twice(
    tmp_path: Path, emulator: Emulator, jobs: Jobs, started_at: datetime
) -> None:
    """Syncs every few seconds while jobs run and end; the state file (and its -wal, -shm,
    lock) is deleted between two syncs. The next sync learns from the API what is billed:
    the run billed in full is not billed again, the running one goes on from where the API
    says it stopped, and in the end every run is billed exactly once."""
    agent = agent_in(tmp_path, emulator, started_at)
    jobs.submit("long", "-c", "2", account="physics", wrap="sleep 14")
    jobs.submit("early", account="chemistry", user="bob", wrap="sleep 1")
    jobs.submit("gpu", "--gres=gpu:1", account="physics", partition="gpu", wrap="sleep 5")
    cluster.wait_state(jobs["long"], {"RUNNING"})
    cluster.wait_all_done([jobs["early"]])
    time.sleep(3)  # more than the reporting interval: the running jobs have usage to bill
    sync_ok(agent)
    time.sleep(SYNC_PERIOD_S)
    sync_ok(agent)
    before = own_events(emulator, jobs.all())
    assert {e.metadata["jobId"] for e in before} >= {jobs["long"], jobs["early"]}
    assert_billed_once(emulator, "before the state file was deleted")

    remove_state(agent)
    jobs.submit("after-loss", account="chemistry", user="bob", wrap="sleep 2")
    sent = len(emulator.requests())
    relearned = sync_ok(agent)  # a new, empty state file at the same path
    assert_billed_once(emulator, f"the first sync after the state file was deleted ({relearned})")
    assert agent.state.exists()
    for event in before:  # nothing billed before the loss came again
        again = [e for e in emulator.events() if e.event_key == event.event_key]
        assert len(again) == 1, event.event_key
    posted = [r["body"]["metadata"] for r in emulator.requests()[sent:] if r["method"] == "POST"]
    early = [m["eventKey"] for m in posted if m.get("jobId") == jobs["early"]]
    assert early == [], f"the run billed in full before the loss was posted again: {early}"

    time.sleep(SYNC_PERIOD_S)
    sync_ok(agent)
    jobs.wait_done()
    sync_ok(agent)
    sync_ok(agent)
    truth = cluster.truth(jobs.all())
    assert len(truth) == 4
    billing = check_billing(emulator.events(), truth)
    long_run = next(k for k, r in truth.items() if r.job_id == jobs["long"])
    assert billing.count(long_run) >= 2  # billed in steps, across the loss
    # the same state path on the same host: one agent, before and after the loss
    assert len(agents_of(emulator.events())) == 1
    (agent_id,) = agents_of(emulator.events())
    assert AGENT_ID.fullmatch(agent_id), agent_id


# -- 2. an old copy of the state file put back -------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_restored_old_state_file_bills_nothing_twice(
    tmp_path: Path, emulator: Emulator, jobs: Jobs, started_at: datetime
) -> None:
    """A copy of the state file taken after the 2nd sync (agent stopped) is put back after the
    4th: what was billed in between (a run in full, more of a running one) is on the API under
    this agent's own id; the restored state adopts it instead of billing it again."""
    agent = agent_in(tmp_path, emulator, started_at)
    jobs.submit("long", "-c", "2", account="physics", wrap="sleep 16")
    jobs.submit("early", account="chemistry", wrap="sleep 1")
    cluster.wait_state(jobs["long"], {"RUNNING"})
    cluster.wait_all_done([jobs["early"]])
    time.sleep(3)
    sync_ok(agent)
    time.sleep(SYNC_PERIOD_S)
    sync_ok(agent)
    backup = agent.state_files()
    assert "state.db" in backup, sorted(backup)

    jobs.submit("between", account="physics", user="alice", wrap="sleep 1")
    jobs.submit("gpu", "--gres=gpu:2", account="chemistry", partition="gpu", wrap="sleep 2")
    cluster.wait_all_done([jobs["between"], jobs["gpu"]])
    time.sleep(1.5)
    sync_ok(agent)
    time.sleep(SYNC_PERIOD_S)
    sync_ok(agent)
    after_backup = own_events(emulator, jobs.all())
    assert {e.metadata["jobId"] for e in after_backup} >= {jobs["between"], jobs["gpu"]}
    assert_billed_once(emulator, "before the old state file was restored")

    restore_state(agent, backup)
    restored = sync_ok(agent)
    assert_billed_once(emulator, f"the first sync after the old state was restored ({restored})")
    for event in after_backup:
        again = [e for e in emulator.events() if e.event_key == event.event_key]
        assert len(again) == 1, event.event_key

    time.sleep(SYNC_PERIOD_S)
    sync_ok(agent)
    jobs.wait_done()
    sync_ok(agent)
    sync_ok(agent)
    truth = cluster.truth(jobs.all())
    assert len(truth) == 4
    billing = check_billing(emulator.events(), truth)
    long_run = next(k for k, r in truth.items() if r.job_id == jobs["long"])
    assert billing.count(long_run) >= 2
    assert len(agents_of(emulator.events())) == 1  # the restored file is the same agent


# -- 3. two agents on one cluster ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_second_agent_refuses_then_takes_over(
    tmp_path: Path, emulator: Emulator, jobs: Jobs, started_at: datetime
) -> None:
    """Two login nodes with the same cron file, each its own state file: the first bills, the
    second refuses (exit 5, a clear message, nothing sent). When the operator says the first
    is stopped (``--take-over``), the second bills only what the first left; the first, if it
    runs again, refuses in its turn. Nothing is billed twice at any point."""
    first = agent_in(tmp_path / "first", emulator, started_at)
    second = agent_in(tmp_path / "second", emulator, started_at)
    jobs.submit("one", account="physics", wrap="sleep 1")
    jobs.submit("two", "-c", "2", account="chemistry", user="bob", wrap="sleep 2")
    jobs.wait_done()
    sync_ok(first)
    check_billing(emulator.events(), cluster.truth(jobs.all()))

    sent = len(emulator.requests())
    refused = sync(second, expect=EXIT_OTHER_AGENT)
    assert "another slurm-tracker" in refused.stderr.lower(), refused
    assert "box" in refused.stderr, f"the message should name the cluster: {refused}"
    assert writes_since(emulator, sent) == [], "the refusing agent changed the API"

    jobs.submit("three", account="physics", user="alice", wrap="sleep 1")
    jobs.wait_done()
    sync_ok(first)  # its own events do not stop it
    sent = len(emulator.requests())
    sync(second, expect=EXIT_OTHER_AGENT)
    assert writes_since(emulator, sent) == []
    check_billing(emulator.events(), cluster.truth(jobs.all()))

    # the operator stops the first agent and lets the second one take over
    jobs.submit("four", "--gres=gpu:1", account="chemistry", partition="gpu", wrap="sleep 2")
    jobs.wait_done()
    sync_ok(second, "--take-over")
    assert_billed_once(emulator, "after --take-over")
    truth = cluster.truth(jobs.all())
    check_billing(emulator.events(), truth)
    sync_ok(second)  # from now on it is the writer: no --take-over needed
    check_billing(emulator.events(), truth)

    by_job: dict[str, set[str]] = defaultdict(set)
    for event in mine(emulator.events(), truth):
        by_job[str(event.metadata["jobId"])].add(str(event.metadata.get("agent")))
    first_ids = by_job[jobs["one"]] | by_job[jobs["two"]] | by_job[jobs["three"]]
    second_ids = by_job[jobs["four"]]
    assert len(first_ids) == 1 and len(second_ids) == 1, dict(by_job)
    assert first_ids != second_ids, "two state files must be two agents"
    for agent_id in first_ids | second_ids:
        assert AGENT_ID.fullmatch(agent_id), agent_id

    # the first agent comes back (the operator forgot its cron): it now sees the second one
    sent = len(emulator.requests())
    back = sync(first, expect=EXIT_OTHER_AGENT)
    assert "another slurm-tracker" in back.stderr.lower(), back
    assert writes_since(emulator, sent) == []
    check_billing(emulator.events(), truth)


# -- 4. going live: the billing floor -----------------------------------------------------------


LOOK_BACK = "4s"  # sacct.first_sync_start as a look-back: the floor is stored by the 1st sync


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
@pytest.mark.parametrize("first_sync_start", ["now", LOOK_BACK])
def test_going_live_bills_nothing_before_the_floor(
    tmp_path: Path, emulator: Emulator, jobs: Jobs, first_sync_start: str
) -> None:
    """Going live while jobs run, with ``sacct.first_sync_start`` = now (absolute) or a short
    look-back (the floor is then the first window's start, stored in the state file): a run
    that ended before the floor is never billed (not even by later windows, which re-read
    ``sacct.overlap`` = 2 min before the mark and must stop at the floor), a run across it is
    billed from the floor on (README: from the floor's offset in wall-clock seconds; it is
    never suspended, so its pieces tile ``[floor - Start, ElapsedRaw)`` and add up to
    End - floor), and later runs exactly."""
    jobs.submit("before", account="chemistry", user="bob", wrap="sleep 1")
    jobs.submit("across", "-c", "2", account="physics", wrap="sleep 16")
    cluster.wait_state(jobs["across"], {"RUNNING"})
    cluster.wait_all_done([jobs["before"]])
    time.sleep(1.5)
    if first_sync_start == LOOK_BACK:
        time.sleep(6)  # 'before' ends more than lag + look-back before the first sync
    floor_at = utc_now().replace(microsecond=0)  # the config holds whole seconds
    agent = agent_in(tmp_path, emulator, floor_at)
    if first_sync_start == LOOK_BACK:
        set_first_sync_start(agent, LOOK_BACK)

    windows = [sync_ok(agent)["window"]]  # going live
    floor = str(windows[0]["start"]) if first_sync_start == LOOK_BACK else rfc3339(floor_at)
    floor_s = int(datetime.fromisoformat(floor.replace("Z", "+00:00")).timestamp())
    assert windows[0]["start"] == floor, windows[0]
    jobs.submit("after", account="physics", user="alice", wrap="sleep 2")
    jobs.submit("after-gpu", "--gres=gpu:1", account="chemistry", partition="gpu", wrap="sleep 4")
    for _ in range(2):
        time.sleep(SYNC_PERIOD_S)
        windows.append(sync_ok(agent)["window"])
    jobs.wait_done()
    windows.append(sync_ok(agent)["window"])
    windows.append(sync_ok(agent)["window"])
    early = [w for w in windows if w is not None and w["start"] < floor]
    assert early == [], f"windows start before the floor {floor}: {early}"

    truth = cluster.truth(jobs.all())
    times = times_of(jobs.all())
    by_role = {
        role: next(k for k, r in truth.items() if r.job_id == jobs[role]) for role in jobs.ids
    }
    before, across = by_role["before"], by_role["across"]
    assert times[before][1] < floor_s, "test setup: 'before' must end before the floor"
    start_s, end_s = times[across]
    assert start_s < floor_s < end_s, "test setup: 'across' must run across the floor"

    events = emulator.events()
    assert not duplicate_keys(events), duplicate_keys(events)
    billed_before = [e.event_key for e in mine(events, [before])]
    assert billed_before == [], f"a run that ended before the floor was billed: {billed_before}"
    check_billing(events, {k: truth[k] for k in (by_role["after"], by_role["after-gpu"])})

    run = truth[across]
    got = sorted(mine(events, [across]), key=lambda e: int(e.metadata["elapsedFrom"]))
    pieces = [(int(e.metadata["elapsedFrom"]), int(e.metadata["elapsedTo"])) for e in got]
    assert run.elapsed_s == end_s - start_s  # never suspended
    from_s = floor_s - start_s
    edges = [from_s] + [p[1] for p in pieces[:-1]]
    assert pieces and [p[0] for p in pieces] == edges and pieces[-1][1] == run.elapsed_s, (
        f"run across the floor: billed pieces {pieces}, expected a tiling of "
        f"[{from_s}, {run.elapsed_s}) (floor {floor}, start {start_s})"
    )
    want = Decimal(run.cpu * (end_s - floor_s)) / 3600
    total = sum((e.quantity for e in got), Decimal(0))
    assert abs(total - want) <= TOLERANCE * len(got), (total, want)
    assert {e.sku for e in got} == {"CPU_HOUR"} and {e.allocation for e in got} == {"physics"}
    assert got[0].started_at == floor, got[0].started_at


def set_first_sync_start(agent: Agent, value: str) -> None:
    """Write ``sacct.first_sync_start: VALUE`` (e.g. a look-back) into the agent's config in
    place of the absolute time the harness writes (until its next ``configure``)."""
    text, count = re.subn(
        r"^(\s+first_sync_start:) .*$", rf'\1 "{value}"', agent.config.read_text(), flags=re.M
    )
    assert count == 1, text
    agent.config.write_text(text)


# -- 5. state rebuild --from-api ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_state_rebuild_from_api_after_a_lost_state(
    tmp_path: Path, emulator: Emulator, jobs: Jobs, started_at: datetime
) -> None:
    """After a lost state file, ``state rebuild --from-api --start T`` writes a state that
    knows what the API holds (and sends nothing); the dry run then plans none of it, and the
    syncs after it bill only the rest."""
    agent = agent_in(tmp_path, emulator, started_at)
    jobs.submit("long", "-c", "2", account="chemistry", wrap="sleep 10")
    jobs.submit("early", account="physics", user="alice", wrap="sleep 1")
    cluster.wait_state(jobs["long"], {"RUNNING"})
    cluster.wait_all_done([jobs["early"]])
    time.sleep(3)
    sync_ok(agent)
    assert {e.metadata["jobId"] for e in own_events(emulator, jobs.all())} >= {
        jobs["long"],
        jobs["early"],
    }

    remove_state(agent)
    sent = len(emulator.requests())
    rebuilt = agent.run("state rebuild", "--from-api", "--start", rfc3339(started_at))
    assert writes_since(emulator, sent) == [], f"the rebuild changed the API: {rebuilt}"
    assert agent.state.exists(), f"no state file after the rebuild: {rebuilt}"
    plan = agent.dry_run()
    again = [
        e["metadata"]["eventKey"] for e in plan["events"] if e["metadata"]["jobId"] == jobs["early"]
    ]
    assert again == [], f"the rebuilt state would bill a billed run again: {again}"

    sync_ok(agent)
    assert_billed_once(emulator, "the first sync after the rebuild")
    jobs.wait_done()
    sync_ok(agent)
    sync_ok(agent)
    check_billing(emulator.events(), cluster.truth(jobs.all()))
