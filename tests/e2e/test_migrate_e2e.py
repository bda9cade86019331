"""Switching from the older Go agent on the real box (issue 13), judged against sacct.

The old agent is simulated from the schema in the issue (tests/old_agent.py): while jobs run
it bills their elapsed seconds so far as core-hours, as it did (events dated Start + seconds,
metadata ``jobId``/``user``/``partition``/``cluster``/``account``/``qos``, no key of ours), and
keeps its ``job_states`` file. Then it stops mid-run; its config and state are migrated
(`migrate config`, `migrate state`, reading the live slurmdbd), and slurm-tracker syncs like
cron until the jobs end. The emulator's totals (old + new events) must equal count x ElapsedRaw
/ 3600 of every run, from an independent final sacct: exact, no key twice, no stretch twice;
and a reconcile across the cutover finds nothing (no foreign event, no double counting).

Workload: a long job (2 cores), a job that ends before the cutover (billed in full by the old
agent), a job requeued before the cutover (the old agent billed its first run whole and the
second in part), a two-task array (billed by JobIDRaw), and a job started after the old agent
stopped (billed in full by slurm-tracker).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Optional

import pytest

from slurm_tracker import api
from tests.e2e import cluster
from tests.e2e.agent import (
    TOLERANCE,
    Agent,
    Jobs,
    Syncer,
    duplicate_keys,
    run_of,
    seconds_ago,
    utc_now,
)
from tests.emulator import DEFAULT_API_KEY, Emulator, StoredEvent
from tests.old_agent import OldRow, event_body, old_config, write_old_config, write_old_state

REQUEUE_SCRIPT = 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then sleep 20; else sleep 600; fi'
SKU = "CPU_HOUR"
ALLOCATIONS = {"physics": "physics", "chemistry": "chemistry"}
EXIT_DISCREPANCIES = 6


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator() as server:
        yield server


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    mine_ = Jobs()
    yield mine_
    mine_.close()


class OldAgent:
    """The Go agent's billing, as the issue describes it: per job id, the elapsed seconds of
    the run it sees, billed in pieces since its last report."""

    def __init__(self, emulator: Emulator) -> None:
        self.client = api.AllocationsClient(emulator.base_url, "test-org", DEFAULT_API_KEY)
        self.billed: dict[cluster.RunId, int] = {}  # run -> elapsed seconds billed
        self.rows: dict[int, OldRow] = {}  # its job_states, by JobIDRaw
        self.starts: dict[cluster.RunId, datetime] = {}

    def report(self, job_ids: list[str]) -> None:
        """One poll: bill every run of these jobs up to its ElapsedRaw now."""
        for run_id, run in sorted(cluster.truth(job_ids).items(), key=lambda kv: kv[0][2]):
            start = _start(run_id)
            if start is None or run.elapsed_s <= self.billed.get(run_id, 0):
                continue
            done = self.billed.get(run_id, 0)
            body = event_body(
                job_id=int(run_id[1]),
                sku=SKU,
                cpus=run.cpu,
                start_at=start,
                from_s=done,
                to_s=run.elapsed_s,
                user="root",
                partition=run.partition,
                cluster=run_id[0],
                account=run.account,
            )
            self.client.post_usage(ALLOCATIONS[run.account], body)
            self.billed[run_id] = run.elapsed_s
            self.starts[run_id] = start
            ended = start + timedelta(seconds=run.elapsed_s) if run.final else None
            self.rows[int(run_id[1])] = OldRow(
                int(run_id[1]),
                start,
                run.elapsed_s,
                cpus=run.cpu,
                ended_at=ended,
                completed_at=utc_now() if run.final else None,
            )


def _start(run_id: cluster.RunId) -> Optional[datetime]:
    out = cluster.run(
        "sacct",
        "--allusers",
        "--allocations",
        "--duplicates",
        "--noheader",
        "--parsable2",
        "--format=JobIDRaw,Submit,Start",
        f"--jobs={run_id[1]}",
    ).stdout
    for line in out.splitlines():
        raw, submit, start = line.split("|")
        if raw == run_id[1] and submit.isdigit() and int(submit) == run_id[2] and start.isdigit():
            return datetime.fromtimestamp(int(start), timezone.utc)
    return None


def test_switching_from_the_go_agent_mid_run(
    slurm_box: None, emulator: Emulator, jobs: Jobs, tmp_path: Path
) -> None:
    started = seconds_ago(5)
    # -- the config, migrated
    old_json = write_old_config(
        tmp_path / "config.json",
        old_config({"compute": SKU, "gpu": SKU}, dict(ALLOCATIONS)),
    )
    agent = Agent(tmp_path, emulator.base_url, started)
    migrated = subprocess.run(
        agent.argv(
            "migrate",
            "config",
            str(old_json),
            "--cluster",
            "box",
            "--organization",
            "test-org",
            "--url",
            emulator.base_url,
        ),
        capture_output=True,
        text=True,
        env=agent.env(),
        check=True,
        timeout=60,
    )
    text = migrated.stdout.replace('"/var/lib/slurm-tracker/state.db"', f'"{agent.state}"')
    agent.config.write_text(
        text
        + "reporting_interval: 2s\n"
        + "sacct: {lag: 1s, overlap: 2m, timeout: 60s, backfill_pause: 0s}\n"
    )
    agent.run("check")

    # -- the old agent bills the jobs while they run
    mem = "--mem=100M"
    jobs.submit("long", "-c", "2", mem, account="physics", wrap="sleep 40")
    jobs.submit("short", mem, account="chemistry", wrap="sleep 2")
    jobs.submit("requeued", mem, account="physics", wrap=REQUEUE_SCRIPT)
    jobs.submit("array", "--array=0-1", mem, account="chemistry", wrap="sleep 30")
    for role in ("long", "requeued"):
        cluster.wait_state(jobs[role], {"RUNNING"})
    cluster.wait_all_done([jobs["short"]])
    old = OldAgent(emulator)
    time.sleep(3)
    old.report(jobs.all())  # the requeued job's first run, in part
    cluster.requeue(jobs["requeued"])
    cluster.wait_state(jobs["requeued"], {"RUNNING"})
    time.sleep(3)
    old.report(jobs.all())  # its first run whole, its second in part; the rest in part
    time.sleep(3)
    # its last poll misses the long job: the cutover (the floor) goes back to that job's last
    # report, and the others' old events then cover part of what follows the floor
    old.report([job for role, job in jobs.ids.items() if role != "long"])
    old_events = len(emulator.events())
    assert old_events >= 8
    assert all("eventKey" not in e.metadata for e in emulator.events())

    # -- the cutover: the old agent stops; a job starts that it never sees
    old_db = write_old_state(tmp_path / "old.db", old.rows.values())
    time.sleep(2)
    jobs.submit("after", mem, account="physics", wrap="sleep 5")
    preview = agent.run("migrate state", str(old_db), "--dry-run", "--output", "json").json()
    assert preview["written"] is False and not preview["problems"], preview
    assert not agent.state.exists()
    done = agent.run("migrate state", str(old_db), "--output", "json").json()
    assert done["written"] is True and not done["unknown"], done
    carried = {r["run"]: r["billedSeconds"] for r in done["runs"]}
    long_run = next(r for r in old.billed if r[1] == jobs["long"])
    floor = datetime.strptime(done["floor"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert floor == old.starts[long_run] + timedelta(seconds=old.billed[long_run])
    for run_id, seconds in old.billed.items():
        assert carried[f"{run_id[0]}:{run_id[1]}:{run_id[2]}"] == seconds

    # -- slurm-tracker syncs like cron until the jobs end
    with Syncer(agent, period_s=2.5):
        jobs.wait_done()
    agent.sync()

    # -- the emulator's totals against the independent truth
    truth = cluster.truth(jobs.all())
    assert all(run.final for run in truth.values()), truth
    events = emulator.events()
    assert not duplicate_keys([e for e in events if e.event_key]), duplicate_keys(events)
    old_by_run: dict[cluster.RunId, list[StoredEvent]] = defaultdict(list)
    new_by_run: dict[cluster.RunId, list[StoredEvent]] = defaultdict(list)
    for event in events:
        if event.event_key is None:
            meta = event.metadata
            run_id = next(
                r
                for r in old.billed
                if r[1] == str(meta["jobId"])
                and old.starts[r]
                <= _at(event.ended_at)
                <= old.starts[r] + timedelta(seconds=truth[r].elapsed_s + 1)
            )
            old_by_run[run_id].append(event)
        elif run_of(event) in truth:
            new_by_run[run_of(event)].append(event)
    problems = []
    totals: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for run_id, run in sorted(truth.items()):
        want = Decimal(run.cpu) * run.elapsed_s / 3600
        got_old = sum((e.quantity for e in old_by_run[run_id]), Decimal(0))
        got_new = sum((e.quantity for e in new_by_run[run_id]), Decimal(0))
        count = len(old_by_run[run_id]) + len(new_by_run[run_id])
        if abs(got_old + got_new - want) > TOLERANCE * max(count, 1):
            problems.append(f"{run_id} {run}: old {got_old} + new {got_new} != {want}")
        pieces = sorted(
            (int(e.metadata["elapsedFrom"]), int(e.metadata["elapsedTo"]))
            for e in new_by_run[run_id]
        )
        edge = old.billed.get(run_id, 0)
        for a, b in pieces:
            if a != edge:
                problems.append(f"{run_id}: new pieces {pieces} leave a gap or overlap at {edge}")
                break
            edge = b
        if edge != run.elapsed_s:
            problems.append(f"{run_id}: billed to {edge} s of {run.elapsed_s} ({pieces})")
        allocation = ALLOCATIONS[run.account]
        totals[allocation][0] += want
        totals[allocation][1] += got_old + got_new
    assert not problems, "\n".join(problems)
    for allocation, (want, got) in totals.items():
        assert abs(want - got) <= TOLERANCE * 50, (allocation, want, got)
    by_role = {
        role: [
            r
            for r in truth
            if r[1].split("_")[0] == jobs[role] or truth[r].job_id.startswith(jobs[role] + "_")
        ]
        for role in jobs.ids
    }
    assert len(by_role["requeued"]) == 2
    assert not new_by_run.get(min(by_role["requeued"], key=lambda r: r[2]))  # its first run: old
    assert not new_by_run.get(next(r for r in truth if truth[r].job_id == jobs["short"]))
    assert not old_by_run.get(next(r for r in truth if truth[r].job_id == jobs["after"]))

    # -- a reconcile across the cutover: no foreign events, no double counting
    result = agent.run(
        "reconcile",
        "--start",
        (started - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "--end",
        utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "--output",
        "json",
        expect=(0, EXIT_DISCREPANCIES),
    )
    doc = json.loads(result.stdout)
    ours = {truth[r].job_id for r in truth}
    mine_ = [
        f for f in doc["findings"] if f["jobId"] in ours or f["jobId"] in {r[1] for r in truth}
    ]
    assert not mine_, mine_
    assert not doc["counts"]["duplicate"] and not doc["counts"]["overlap"], doc["counts"]
    assert not doc["counts"]["other-agent"], doc["counts"]
    shown = [(e.metadata["jobId"], e.started_at, e.ended_at) for e in events if not e.event_key]
    assert doc["oldAgentEvents"] == old_events, (doc["oldAgentEvents"], shown, truth)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
