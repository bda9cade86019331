"""Corrections on the real box (issue 9, "Tests must show" (5)): a run whose End an admin fixes.

A job runs for a while and is billed in steps while it runs, then in full once it ends; both
checked exactly against the independent final sacct (``agent.check_billing``). Then the test
plays the admin who fixes it like a runaway job: it shortens the job's End in slurmdbd's own
database (MariaDB ``slurm_acct_db``, table ``<cluster>_job_table``: ``time_end`` =
``time_start`` + N, the job's steps cut to the same End), so that sacct reports ElapsedRaw N,
below what was billed, while the record still lies inside the agents' next sync window (the
window re-reads ``sacct.overlap`` = 2 min before the mark).

Two agents, each with its own emulator (so neither sees the other as a second writer), billed
the same job:

- ``manual`` has the default config (``corrections.apply`` false): its next sync records the
  correction (``corrections list``: billed vs now) and changes nothing on the API;
  ``corrections apply`` (dry) shows the fix and changes nothing; ``corrections apply --yes``
  deletes the events reaching beyond N and posts their valid part again;
- ``auto`` has ``corrections: {apply: true}``: its next sync records and applies it.

Both end with the API holding exactly the new truth (``cluster.truth`` read after the fix):
stretches tiling ``[0, N)`` once, quantities summing to 2 CPUs x N s, no event key ever
accepted twice (deleted events included); applying again, or syncing again, changes nothing.

N is chosen inside one of the stretches billed while the job ran (not the first), so the fix
keeps whole events below N, cuts one across N (deleted, its part below N posted again under a
new key) and deletes those above it.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
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
    mine,
    seconds_ago,
)
from tests.emulator import Emulator, StoredEvent

RUN_S = 30  # the job's sleep: long enough to be billed in a few steps while it runs
CPUS = 2
SYNC_PERIOD_S = 3.5  # "cron" while the job runs: more than the 2 s reporting interval
SACCT_RETRY_S = 90
MYSQL_SOCKET = "/run/mysqld/mysqld.sock"  # tests/e2e/box/start.sh
ACCT_DB = "slurm_acct_db"  # slurmdbd.conf StorageLoc


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    mine_ = Jobs()
    yield mine_
    mine_.close()


# -- helpers ---------------------------------------------------------------------------------


def sync(agent: Agent) -> dict[str, Any]:
    """One sync that must succeed; a temporary sacct failure (slurmdbd restarted by another
    test on the shared box) is simply run again, as cron would, for up to SACCT_RETRY_S."""
    deadline = time.monotonic() + SACCT_RETRY_S
    while True:
        done = agent.sync(expect={EXIT_OK, EXIT_TEMPFAIL})
        if done.returncode == EXIT_OK:
            result = dict(done.json())
            assert result["outcome"] == "ok", done
            return result
        assert "sacct failed" in done.stderr, f"expected exit 0: {done}"
        assert time.monotonic() < deadline, f"sacct kept failing for {SACCT_RETRY_S}s: {done}"
        time.sleep(2)


def corrections(agent: Agent, *args: str) -> list[dict[str, Any]]:
    """``corrections list --output json [ARGS]``."""
    return list(agent.run("corrections list", "--output", "json", *args).json())


def apply(agent: Agent, *args: str) -> tuple[Done, dict[str, Any]]:
    """``corrections apply --output json [ARGS]`` (dry unless ``--yes``), exit 0."""
    done = agent.run("corrections apply", "--output", "json", *args)
    return done, dict(done.json())


def sql(statement: str) -> list[list[str]]:
    """Run SQL as root on the box's MariaDB, in slurmdbd's database; rows of the last result."""
    done = subprocess.run(
        ["mariadb", f"--socket={MYSQL_SOCKET}", "--batch", "--skip-column-names", ACCT_DB],
        input=statement,
        capture_output=True,
        text=True,
        timeout=cluster.COMMAND_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise cluster.BoxError(f"mariadb: exit {done.returncode}: {done.stderr.strip()}")
    return [line.split("\t") for line in done.stdout.splitlines()]


def fix_end(run_id: cluster.RunId, elapsed_s: int) -> None:
    """Play the admin fixing a runaway job: set the run's End to Start + ``elapsed_s`` in
    slurmdbd's database (its job row, and the End of its steps where later), as ``sacctmgr
    show runaway`` does with End = Start. slurmdbd reads the table on every query: sacct shows
    it at once."""
    name, job_id_raw, submit = run_id
    assert name.isidentifier() and job_id_raw.isdigit(), run_id
    rows = sql(
        f"SELECT job_db_inx, time_start, time_end FROM {name}_job_table "
        f"WHERE id_job = {int(job_id_raw)} AND time_submit = {int(submit)} AND deleted = 0"
    )
    assert len(rows) == 1, f"expected one job row for {run_id}, found {rows}"
    inx, start, end = (int(v) for v in rows[0])
    assert start > 0 and start + elapsed_s < end, (start, end, elapsed_s)
    new_end = start + elapsed_s
    sql(
        f"UPDATE {name}_job_table SET time_end = {new_end} WHERE job_db_inx = {inx};\n"
        f"UPDATE {name}_step_table SET time_end = {new_end} "
        f"WHERE job_db_inx = {inx} AND time_end > {new_end};"
    )
    (row,) = sql(f"SELECT time_end FROM {name}_job_table WHERE job_db_inx = {inx}")
    assert int(row[0]) == new_end, row


def pieces(events: Sequence[StoredEvent]) -> list[tuple[int, int]]:
    return sorted((int(e.metadata["elapsedFrom"]), int(e.metadata["elapsedTo"])) for e in events)


def inside_a_later_piece(billed: Sequence[tuple[int, int]]) -> int:
    """A number of seconds strictly inside a billed stretch other than the first."""
    for start, end in billed[1:]:
        if end - start >= 2:
            return start + (end - start) // 2
    raise AssertionError(f"no billed stretch after the first is 2 s long or more: {billed}")


def accepted_keys(emulator: Emulator) -> Counter[str]:
    """Event keys of every POST the emulator accepted, deleted events included."""
    return Counter(
        str(r["body"]["metadata"]["eventKey"])
        for r in emulator.requests()
        if r["method"] == "POST" and isinstance(r["status"], int) and 200 <= r["status"] < 300
    )


def assert_no_key_accepted_twice(emulator: Emulator, when: str) -> None:
    twice = sorted(k for k, n in accepted_keys(emulator).items() if n > 1)
    assert not twice, f"{when}: event keys accepted twice: {twice}"


def writes_of(emulator: Emulator, since: int, job_id: str) -> list[str]:
    """Deletes since request number ``since``, and posts of events of job ``job_id`` (other
    jobs of the shared box that end in the window may be billed meanwhile)."""
    found = []
    for r in emulator.requests()[since:]:
        if r["method"] == "DELETE" or (
            r["method"] == "POST" and (r["body"] or {}).get("metadata", {}).get("jobId") == job_id
        ):
            found.append(f"{r['method']} {r['path']} {r['body']}")
    return found


def snapshot(events: Sequence[StoredEvent]) -> list[tuple[str, str, Decimal]]:
    return sorted((e.id, str(e.event_key), e.quantity) for e in events)


# -- the scenario ----------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_runaway_style_correction_is_listed_and_applied_on_request(
    tmp_path: Path, jobs: Jobs
) -> None:
    """Billed in steps and in full, then the admin cuts the run's End: the default config
    lists the correction and leaves the API as it is until ``corrections apply --yes``; with
    ``corrections.apply: true`` the sync applies it. Both APIs then hold exactly the new truth,
    and applying or syncing again changes nothing."""
    started_at = seconds_ago(5)
    with Emulator() as api_manual, Emulator() as api_auto:
        (tmp_path / "manual").mkdir()
        (tmp_path / "auto").mkdir()
        manual = Agent(tmp_path / "manual", api_manual.base_url, started_at)
        auto = Agent(
            tmp_path / "auto",
            api_auto.base_url,
            started_at,
            extra_config="corrections: {apply: true}\n",
        )
        agents = {"manual": (manual, api_manual), "auto": (auto, api_auto)}

        job = jobs.submit("runaway", "-c", str(CPUS), account="physics", wrap=f"sleep {RUN_S}")
        cluster.wait_state(job, {"RUNNING"})
        time.sleep(3)  # more than the reporting interval: the running job has usage to bill
        while cluster.current_state(job) == "RUNNING":
            for agent, _ in agents.values():
                sync(agent)
            time.sleep(SYNC_PERIOD_S)
        jobs.wait_done()
        for agent, _ in agents.values():
            sync(agent)
            sync(agent)

        # billed in full, in steps, exactly as slurmdbd says
        before = cluster.truth([job])
        (run_id,) = before
        assert before[run_id].elapsed_s >= RUN_S, before
        assert before[run_id].cpu == CPUS, before
        billed: dict[str, list[tuple[int, int]]] = {}
        for name, (agent, api) in agents.items():
            billing = check_billing(api.events(), before)
            assert billing.count(run_id) >= 2, f"not billed in steps: {api.events()}"
            assert corrections(agent, "--all") == []
            billed[name] = pieces(mine(api.events(), [run_id]))

        # the admin fixes the run's End like a runaway job's
        fixed_s = inside_a_later_piece(billed["manual"])
        fix_end(run_id, fixed_s)
        after = cluster.truth([job])
        assert after[run_id].elapsed_s == fixed_s, f"sacct after the fix: {after}"
        assert after[run_id].final and after[run_id].state == before[run_id].state, after
        run_text = f"{run_id[0]}:{run_id[1]}:{run_id[2]}"

        # (a) default config: the sync lists it and the API stays as it is
        kept_events = snapshot(api_manual.events())
        sent = len(api_manual.requests())
        result = sync(manual)
        assert result["skipped"] >= 1, result
        assert writes_of(api_manual, sent, job) == [], "the default config changed the API"
        assert snapshot(api_manual.events()) == kept_events
        (listed,) = corrections(manual)
        assert listed["run"] == run_text and listed["jobId"] == job, listed
        assert listed["status"] == "open", listed
        assert (listed["allocations"], listed["skus"]) == (["physics"], ["CPU_HOUR"]), listed
        assert listed["billedSeconds"] == before[run_id].elapsed_s, listed
        assert listed["slurmdbdSeconds"] == fixed_s, listed
        assert listed["overBilledSeconds"] == before[run_id].elapsed_s - fixed_s, listed
        assert manual.status()["openCorrections"] == 1
        sync(manual)  # seen again: still one open correction, still nothing sent
        assert writes_of(api_manual, sent, job) == []
        (again,) = corrections(manual)
        assert again["status"] == "open" and again["timesSeen"] >= 2, again

        # the dry apply shows the fix and changes nothing
        events = mine(api_manual.events(), [run_id])
        beyond = sorted(str(e.event_key) for e in events if int(e.metadata["elapsedTo"]) > fixed_s)
        cut = [p for p in billed["manual"] if p[0] < fixed_s < p[1]]
        assert len(cut) == 1 and len(beyond) >= 1, (billed["manual"], fixed_s)
        _, plan = apply(manual)
        assert plan["done"] is False, plan
        (planned,) = plan["corrections"]
        assert planned["status"] == "planned" and planned["run"] == run_text, planned
        assert sorted(d["eventKey"] for d in planned["delete"]) == beyond, planned
        posts = [
            (p["metadata"]["elapsedFrom"], p["metadata"]["elapsedTo"]) for p in planned["post"]
        ]
        assert posts == [(cut[0][0], fixed_s)], planned
        assert writes_of(api_manual, sent, job) == [], "the dry apply changed the API"

        # (b1) corrections apply --yes: exactly the new truth
        _, done = apply(manual, "--yes")
        assert (done["done"], done["applied"], done["open"]) == (True, 1, 0), done
        assert done["corrections"][0]["deleted"] == len(beyond), done
        check_billing(api_manual.events(), after)
        assert_no_key_accepted_twice(api_manual, "after corrections apply --yes")
        kept = {e.event_key for e in events if int(e.metadata["elapsedTo"]) <= fixed_s}
        now_keys = {e.event_key for e in mine(api_manual.events(), [run_id])}
        assert kept < now_keys and not set(beyond) & now_keys, (kept, beyond, now_keys)
        new = [e for e in mine(api_manual.events(), [run_id]) if e.event_key not in kept]
        assert pieces(new) == [(cut[0][0], fixed_s)], new
        assert all(e.metadata.get("correction") is True for e in new), new
        total = sum((e.quantity for e in mine(api_manual.events(), [run_id])), Decimal(0))
        assert abs(total - Decimal(CPUS * fixed_s) / 3600) <= TOLERANCE * len(now_keys), total
        assert corrections(manual) == []
        (applied,) = corrections(manual, "--all")
        assert applied["status"] == "applied" and applied["resolvedAt"], applied
        assert manual.status()["openCorrections"] == 0

        # applying again, or syncing again, changes nothing
        corrected = snapshot(api_manual.events())
        sent = len(api_manual.requests())
        _, twice = apply(manual, "--yes")
        assert twice["corrections"] == [], twice
        sync(manual)
        assert writes_of(api_manual, sent, job) == [], "a second apply or sync changed the API"
        assert snapshot(api_manual.events()) == corrected
        assert corrections(manual) == []
        check_billing(api_manual.events(), after)

        # (b2) corrections.apply: true: the sync records and applies it
        sync(auto)
        check_billing(api_auto.events(), after)
        assert_no_key_accepted_twice(api_auto, "after the sync that applied the correction")
        assert corrections(auto) == []
        (applied,) = corrections(auto, "--all")
        assert applied["status"] == "applied" and applied["slurmdbdSeconds"] == fixed_s, applied
        assert applied["billedSeconds"] == before[run_id].elapsed_s, applied
        corrected = snapshot(api_auto.events())
        sent = len(api_auto.requests())
        sync(auto)
        assert writes_of(api_auto, sent, job) == [], "the next sync changed the API"
        assert snapshot(api_auto.events()) == corrected
        check_billing(api_auto.events(), after)
