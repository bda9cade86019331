"""The API as the record of what was billed (issue 9): keys read back, the agent's identity, a
lost, replaced or restored state file catching up instead of billing again, a second agent
refused, and the billing floor. Through the CLI against the project's API emulator."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import Result

from slurm_tracker import ledger, pipeline
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.events import event_key
from slurm_tracker.models import ParseResult, UsageSegment
from slurm_tracker.state import State
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, Emulator
from tests.factories import live_capture, record, write_fake_sacct

NOW = int(time.time())
T = (NOW // 60 - 180) * 60  # three hours ago


def test_event_keys_are_read_back() -> None:
    run = record(job_id="4242", cluster="hpc")
    segment = UsageSegment(run, 900, 1800, run.start_at, run.start_at)  # type: ignore[arg-type]
    key = event_key(segment, "CPU_HOUR")
    parts = ledger.parse_event_key(key)
    assert parts is not None
    assert (parts.cluster, parts.job_id_raw, parts.from_s, parts.to_s, parts.sku) == (
        "hpc",
        "4242",
        900,
        1800,
        "CPU_HOUR",
    )
    assert parts.run == run.run.text
    for other in ("", "st1:hpc:1:2:3-3:X", "st2:hpc:1:2:0-5:X", "jobId 42", "st1:hpc:1:x:0-5:X"):
        assert ledger.parse_event_key(other) is None


def test_the_agent_is_the_state_file_on_this_host(tmp_path: Path) -> None:
    one = ledger.agent_id(tmp_path / "a" / "state.db")
    assert one == ledger.agent_id(tmp_path / "a" / "state.db")
    assert one != ledger.agent_id(tmp_path / "b" / "state.db")
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert ledger.agent_id(tmp_path / "link" / "state.db") == one  # the real path counts


def job(number: int, elapsed: int, *, running: bool = False) -> dict[str, str]:
    start = T + number * 60
    return {
        "JobID": str(number),
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(start - 30),
        "Start": str(start),
        "End": "Unknown" if running else str(start + elapsed),
        "ElapsedRaw": str(elapsed),
        "State": "RUNNING" if running else "COMPLETED",
        "AllocTRES": "billing=2,cpu=2,mem=1G,node=1",
    }


class Site:
    """A config, a fake sacct serving a capture, and the emulator, for CLI runs."""

    def __init__(self, root: Path, emulator: Emulator, name: str = "site") -> None:
        self.root = root / name
        self.root.mkdir(mode=0o700)
        self.capture = self.root / "capture.txt"
        self.capture.write_bytes(live_capture([]))
        sacct = write_fake_sacct(self.root / "sacct", self.capture)
        self.config = self.root / "config.yaml"
        self.config.write_text(
            "cluster: box\n"
            f"state_file: {self.root / 'state' / 'state.db'}\n"
            "reporting_interval: 10m\n"
            f"api: {{organization: test-org, url: '{emulator.base_url}', max_attempts: 2, "
            "max_retry_time: 5s}\n"
            f"sacct: {{path: '{sacct}', lag: 1m}}\n"
            "accounts: {map: {physics: physics}}\n"
            "partitions: {map: {compute: CPU_HOUR}}\n"
        )
        self.state = self.root / "state" / "state.db"

    def jobs(self, *rows: dict[str, str]) -> None:
        self.capture.write_bytes(live_capture(list(rows)))

    def run(self, *args: str) -> Result:
        return cli_runner().invoke(
            main,
            [*args, "--config", str(self.config)],
            env={"PW_API_KEY": DEFAULT_API_KEY},
        )

    def sync(self, *args: str, code: int = 0) -> Result:
        result = self.run("sync", "--output", "json", *args)
        assert result.exit_code == code, shown(result)
        return result


def accepted(emulator: Emulator) -> Counter[str]:
    return Counter(str(e.metadata.get("eventKey")) for e in emulator.events())


def billed_seconds(emulator: Emulator) -> dict[str, int]:
    """Per job, elapsed seconds billed (exactly once each, or the test fails)."""
    covered: dict[str, list[tuple[int, int]]] = {}
    for event in emulator.events():
        meta = event.metadata
        covered.setdefault(str(meta["jobId"]), []).append(
            (int(meta["elapsedFrom"]), int(meta["elapsedTo"]))
        )
    out = {}
    for job_id, spans in covered.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end == start, f"job {job_id}: {spans} overlap or leave a gap"
        out[job_id] = sum(b - a for a, b in spans)
    return out


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator() as running:
        yield running


def test_events_name_their_agent(tmp_path: Path, emulator: Emulator) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600))
    site.sync()
    (event,) = emulator.events()
    assert event.metadata["agent"] == ledger.agent_id(site.state)
    dry = json.loads(site.run("sync", "--dry-run", "--output", "json").stdout)
    assert dry["events"] == []


def test_a_lost_state_file_learns_from_the_api_and_bills_only_the_rest(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600), job(2, 1200, running=True))
    site.sync()
    assert billed_seconds(emulator) == {"1": 3600, "2": 1140}  # the last minute is held back
    for path in site.state.parent.iterdir():
        path.unlink()  # the state file is lost
    site.jobs(job(1, 3600), job(2, 2400))  # job 2 went on and ended
    out = json.loads(site.sync().stdout)
    assert out["posted"] == 1
    assert billed_seconds(emulator) == {"1": 3600, "2": 2400}
    assert max(accepted(emulator).values()) == 1
    with State.open(site.state, readonly=True) as store:
        assert store.counts()["acked"] == 3  # two adopted, one posted


def test_a_restored_backup_catches_up_instead_of_billing_again(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600))
    site.sync()
    backup = tmp_path / "backup"
    shutil.copytree(site.state.parent, backup)
    site.jobs(job(1, 3600), job(2, 1800), job(3, 600))
    site.sync()
    shutil.rmtree(site.state.parent)
    shutil.copytree(backup, site.state.parent)  # yesterday's backup comes back
    os.chmod(site.state.parent, 0o700)
    site.jobs(job(1, 3600), job(2, 1800), job(3, 600), job(4, 900))
    out = json.loads(site.sync().stdout)
    assert out["posted"] == 1  # only job 4 is new
    assert billed_seconds(emulator) == {"1": 3600, "2": 1800, "3": 600, "4": 900}
    assert max(accepted(emulator).values()) == 1


def test_a_second_agent_on_the_cluster_stops_then_takes_over(
    tmp_path: Path, emulator: Emulator
) -> None:
    first = Site(tmp_path, emulator, "first")
    second = Site(tmp_path, emulator, "second")
    first.jobs(job(1, 3600))
    second.jobs(job(1, 3600), job(2, 600))
    first.sync()
    refused = second.sync(code=5)
    assert "another slurm-tracker bills cluster box" in shown(refused)
    assert ledger.agent_id(first.state) in shown(refused)
    assert len(emulator.events()) == 1  # the second one posted nothing
    taken = json.loads(second.sync("--take-over").stdout)  # the first one is gone for good
    assert taken["posted"] == 1
    assert billed_seconds(emulator) == {"1": 3600, "2": 600}
    assert max(accepted(emulator).values()) == 1
    # from now on the second agent is the only writer; the first one would be refused
    first.jobs(job(1, 3600), job(2, 600), job(3, 60))
    second.jobs(job(1, 3600), job(2, 600), job(3, 60))
    second.sync()
    first.sync(code=5)


def test_events_without_an_agent_are_adopted_not_refused(
    tmp_path: Path, emulator: Emulator
) -> None:
    # Events posted by versions before agents named themselves carry no agent.
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600))
    site.sync()
    for event in emulator.events():
        event.metadata.pop("agent")  # type: ignore[attr-defined]
    for path in site.state.parent.iterdir():
        path.unlink()
    site.sync()
    assert len(emulator.events()) == 1


def test_a_new_state_file_bills_nothing_while_the_api_cannot_be_read(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600))
    emulator.outage(60)
    result = site.run("sync")
    assert result.exit_code == 75, shown(result)
    assert "must first learn from the API" in shown(result)
    with State.open(site.state, readonly=True) as store:
        assert store.to_send() == [] and store.high_water_at() is None


def test_the_floor_bounds_every_window_and_billed_usage(tmp_path: Path, emulator: Emulator) -> None:
    site = Site(tmp_path, emulator)
    floor = datetime.fromtimestamp(T + 1800, timezone.utc)
    text = site.config.read_text().replace(
        "lag: 1m}", f'lag: 1m, first_sync_start: "{floor:%Y-%m-%dT%H:%M:%SZ}"}}'
    )
    site.config.write_text(text)
    before = job(1, 600)  # T+60 .. T+660: ended before the floor
    across = job(2, 3600)  # T+120 .. T+3720: billed from the floor on
    after = job(40, 600)  # T+2400 ..
    site.jobs(before, across, after)
    out = json.loads(site.sync().stdout)
    assert out["skipped"] >= 1
    assert billed_seconds(emulator) == {"2": 3600 - (1800 - 120), "40": 600}
    with State.open(site.state, readonly=True) as store:
        assert store.floor_at() == floor
    # a later window never reaches before the floor, whatever the overlap
    dry = json.loads(site.run("sync", "--dry-run", "--output", "json").stdout)
    assert dry["window"]["start"] >= f"{floor:%Y-%m-%dT%H:%M:%SZ}"


def test_outbox_retry_all_leaves_dropped_events_alone(tmp_path: Path, emulator: Emulator) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600), job(2, 3600))
    emulator.add_fault({"kind": "status", "status": 400, "times": 2, "method": "POST"})
    site.sync(code=4)
    with State.open(site.state, readonly=True) as store:
        dead = [r.event_key for r in store.outbox(("dead",))]
    assert len(dead) == 2
    assert "1 event dropped" in shown(site.run("outbox", "drop", dead[0]))
    assert "1 event back to pending" in shown(site.run("outbox", "retry", "--all"))
    with State.open(site.state, readonly=True) as store:
        assert [r.event_key for r in store.outbox(("dropped",))] == [dead[0]]
    assert "1 event back to pending" in shown(site.run("outbox", "retry", dead[0]))  # by name


def test_quantities_are_unchanged_by_adoption(tmp_path: Path, emulator: Emulator) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 5400))
    site.sync()
    shutil.rmtree(site.state.parent)
    site.sync()
    total = sum((Decimal(str(e.quantity)) for e in emulator.events()), Decimal(0))
    assert total == Decimal(3)  # 2 cores x 1.5 h, once


def test_state_rebuild_from_the_api(tmp_path: Path, emulator: Emulator) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600), job(2, 600))
    site.sync()
    shutil.rmtree(site.state.parent)
    result = site.run("state", "rebuild", "--from-api", "--start", "2026-01-01T00:00:00Z")
    assert result.exit_code == 0, shown(result)
    assert "2 were unknown" in shown(result)
    with State.open(site.state, readonly=True) as store:
        assert store.counts()["acked"] == 2
    again = site.run("state", "rebuild", "--from-api", "--start", "2026-01-01T00:00:00Z")
    assert "0 were unknown" in shown(again)
    assert json.loads(site.sync().stdout)["posted"] == 0
    assert len(emulator.events()) == 2


def test_a_long_suspended_run_forgotten_by_prune_is_not_billed_again(tmp_path: Path) -> None:
    # State.prune forgets final runs by start + billed elapsed seconds, which leaves the
    # suspended time out: such a run can be pruned while its real End is still inside the
    # next window's overlap. It is then re-read with no progress row: it must not be billed
    # again (issue 9, "read from the code").
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(days=3)
    suspended = record(job_id="77", start_at=start, elapsed_s=3600)
    suspended = replace(suspended, end_at=now - timedelta(minutes=10))
    config = config_from_text(
        "cluster: box\naccounts: {map: {physics: phys}}\npartitions: {map: {compute: CPU}}\n",
        "test",
    )
    parsed = ParseResult(records=(suspended,), rejected=())
    with State.open(tmp_path / "state.db") as store:
        first = pipeline.plan_usage(parsed, {}, config, now_at=now)
        assert [e.quantity for e in first.events] == [Decimal(4)]
        pipeline.commit(store, first, now, now)
        removed, _ = store.prune(now, 3600, 30 * 86400)
        assert removed == 1  # start + 1 h is long before the horizon, its End is not
        again = pipeline.plan_usage(
            parsed,
            store.reported([suspended.run]),
            config,
            now_at=now,
            forgotten_before=store.pruned_before(),
        )
    assert again.events == ()
    assert "no longer remembers what was billed" in again.skipped[0].reason


@pytest.mark.parametrize(
    ("typo", "fixed"),
    [
        ("physics: phyiscs", "physics: physics"),  # allocation typo: 404, same key after
        ("compute: CPU_HOURS", "compute: CPU_HOUR"),  # SKU typo: 400, a new key after
    ],
)
def test_outbox_replan_maps_dead_events_again(
    tmp_path: Path, emulator: Emulator, typo: str, fixed: str
) -> None:
    site = Site(tmp_path, emulator)
    good = site.config.read_text()
    site.config.write_text(good.replace(fixed, typo))
    site.jobs(job(1, 3600))
    site.sync(code=4)
    assert emulator.events() == []
    site.config.write_text(good)
    assert "1 event back to pending" in shown(site.run("outbox", "retry", "--all"))
    site.config.write_text(good.replace(fixed, typo))
    site.sync(code=4)  # the frozen allocation/SKU fails again: retry cannot fix a typo
    site.config.write_text(good)
    assert site.run("outbox", "replan").exit_code == 2  # names or --all
    result = site.run("outbox", "replan", "--all")
    assert result.exit_code == 0, shown(result)
    assert "replanned" in shown(result)
    site.sync()
    (event,) = emulator.events()
    assert (event.allocation, event.sku) == ("physics", "CPU_HOUR")
    assert event.metadata["eventKey"].endswith(":CPU_HOUR")
    assert billed_seconds(emulator) == {"1": 3600}
    assert site.run("outbox", "replan", "--all").stdout.startswith("no dead events")


def test_outbox_replan_acks_a_dead_event_that_landed_after_all(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator)
    site.jobs(job(1, 3600))
    site.sync()
    conn = sqlite3.connect(site.state)
    conn.execute("UPDATE outbox SET status='dead'")
    conn.commit()
    conn.close()
    result = site.run("outbox", "replan", "--all")
    assert result.exit_code == 0, shown(result)
    assert "found" in shown(result)
    site.sync()
    assert len(emulator.events()) == 1
    with State.open(site.state, readonly=True) as store:
        assert store.counts()["acked"] == 1


def test_outbox_replan_refuses_what_the_config_no_longer_maps(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator)
    good = site.config.read_text()
    site.config.write_text(good.replace("physics: physics", "physics: phyiscs"))
    site.jobs(job(1, 3600))
    site.sync(code=4)
    site.config.write_text(good.replace("physics: physics", "chemistry: chemistry"))
    result = site.run("outbox", "replan", "--all")
    assert result.exit_code == 4
    assert "refused" in shown(result) and "maps to no allocation" in shown(result)
