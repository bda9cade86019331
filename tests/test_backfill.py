"""Backfill: progress lines and ETA, the end capped at now - lag, resuming after a stop,
delivering chunk by chunk, saved captures, and outcomes recorded apart from syncs."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from slurm_tracker import backfill
from slurm_tracker.config import load_config
from slurm_tracker.health import sync_history
from slurm_tracker.inputs import Window
from slurm_tracker.models import JobRecord, ParseResult, Tres
from slurm_tracker.state import State
from tests.conftest import shown
from tests.factories import live_capture, write_fake_sacct
from tests.fake_api import BASE, FakeApi, serving
from tests.test_cli import CONFIG, ROWS, run

UTC = timezone.utc
DAY = 86400
# Six days ago, at midnight: a backfill of the last days reads chunks wholly in the past.
D0 = (int(time.time()) // DAY - 6) * DAY


def at(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rows_per_day(days: int) -> list[dict[str, str]]:
    """One finished 1-hour 2-core run of physics per day, from D0 (a chunk each)."""
    return [
        {
            **ROWS[0],
            "JobID": str(100 + n),
            "Submit": str(D0 + n * DAY + 3600),
            "Start": str(D0 + n * DAY + 3600),
            "End": str(D0 + n * DAY + 7200),
            "AllocTRES": "cpu=2,mem=1G,node=1,billing=2",
        }
        for n in range(days)
    ]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    sacct = tmp_path / "fake-sacct"
    capture = tmp_path / "capture.txt"
    capture.write_bytes(live_capture(rows_per_day(4)))
    (tmp_path / "capture.txt.by-window").touch()  # sacct prints the runs of the window asked
    write_fake_sacct(sacct, capture)
    (tmp_path / "config.yaml").write_text(CONFIG.format(base=BASE, sacct=sacct))
    return tmp_path


class CountingApi(FakeApi):
    """The fake API, noting how many sacct calls were made before each POST."""

    def __init__(self, site: Path) -> None:
        super().__init__()
        self.site = site
        self.calls_at_post: list[int] = []

    def post(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.calls_at_post.append(len(calls(self.site)))
        return super().post(request)


@pytest.fixture
def api(site: Path) -> Any:
    fake = CountingApi(site)
    with serving(fake):
        yield fake


def calls(site: Path) -> list[str]:
    path = site / "capture.txt.calls"
    return path.read_text().splitlines() if path.exists() else []


def start_of(call: str) -> str:
    """The --starttime of a logged sacct call, as RFC 3339."""
    given = call.split("--starttime ")[1].split(" ", maxsplit=1)[0]
    return at(int(datetime.strptime(given, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()))


def four_days(site: Path, *args: str) -> Any:
    return run(
        site, "backfill", "--start", at(D0), "--end", at(D0 + 4 * DAY), "--chunk", "1d", *args
    )


# ------------------------------------------------------------------ pure parts
def test_the_eta_comes_from_the_chunks_read_not_the_resumed_ones() -> None:
    clock = iter([100.0, 120.0, 140.0]).__next__
    eta = backfill.Eta(clock)
    w = Window(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
    resumed = eta.line(backfill.Chunk(1, 5, w, resumed=True))
    assert resumed.startswith("backfill chunk 1/5 [2026-01-01T00:00:00Z, 2026-01-02T00:00:00Z)")
    assert "not read again" in resumed
    # one chunk read in 20 s, three left: 60 s
    assert eta.line(backfill.Chunk(2, 5, w, records=812, events=1490)).endswith(
        ": 812 records, 1490 events; ETA 60 s"
    )
    # two read in 40 s, two left: 40 s; the last chunk has no ETA
    assert eta.line(backfill.Chunk(3, 5, w, 1, 1)).endswith("ETA 40 s")
    assert "ETA" not in backfill.Eta(lambda: 0.0).line(backfill.Chunk(5, 5, w, 1, 1))


def test_the_end_is_capped_at_now_minus_the_lag() -> None:
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    assert backfill.capped_end(now + timedelta(days=3), now, 600) == now - timedelta(minutes=10)
    assert backfill.capped_end(now - timedelta(days=3), now, 600) == now - timedelta(days=3)


def test_a_saved_capture_keeps_the_runs_that_ran_in_the_period() -> None:
    def record(job: str, start: int, end: int | None) -> JobRecord:
        began = datetime.fromtimestamp(start, UTC)
        return JobRecord(
            "box",
            job,
            job,
            began,
            began,
            None if end is None else datetime.fromtimestamp(end, UTC),
            0,
            "RUNNING",
            "a",
            "p",
            "u",
            Tres(),
        )

    window = Window(datetime.fromtimestamp(1000, UTC), datetime.fromtimestamp(2000, UTC))
    records = (
        record("before", 0, 999),
        record("ends-at-start", 0, 1000),
        record("inside", 1200, 1300),
        record("running", 1500, None),
        record("at-end", 2000, 2100),
    )
    kept = backfill.in_period(ParseResult(records, ()), window)
    assert [r.job_id for r in kept.records] == ["ends-at-start", "inside", "running"]


# ------------------------------------------------------------------ the command
def test_a_backfill_delivers_each_chunk_before_reading_the_next(
    site: Path, api: CountingApi
) -> None:
    result = four_days(site, "--output", "json")
    assert result.exit_code == 0, shown(result)
    assert json.loads(result.stdout)["posted"] == 4 == len(api.events)
    # the event of day n was posted after the nth sacct call and before the next one
    assert api.calls_at_post == [1, 2, 3, 4]
    assert len(calls(site)) == 4
    lines = [x for x in result.stderr.splitlines() if x.startswith("backfill chunk")]
    assert [x.split(" [")[0] for x in lines] == [f"backfill chunk {n}/4" for n in (1, 2, 3, 4)]
    assert "1 records, 1 events; ETA" in lines[0] and "ETA" not in lines[3]


def test_a_stopped_backfill_goes_on_from_its_next_chunk(site: Path, api: FakeApi) -> None:
    (site / "capture.txt.fail-after").write_text("2")  # slurmdbd goes away after two chunks
    first = four_days(site)
    assert first.exit_code == 75, shown(first)
    assert len(api.events) == 2 and len(calls(site)) == 3
    (site / "capture.txt.fail-after").unlink()
    second = four_days(site, "--output", "json")
    assert second.exit_code == 0, shown(second)
    assert "resuming the backfill from" in second.stderr
    # chunks 1 and 2 are not read again: one failed call for chunk 3, then 3 and 4
    assert len(calls(site)) == 5
    assert [start_of(c) for c in calls(site)[3:]] == [at(D0 + 2 * DAY), at(D0 + 3 * DAY)]
    assert json.loads(second.stdout)["posted"] == 2
    assert sorted(e["metadata"]["jobId"] for e in api.events) == ["100", "101", "102", "103"]
    # finished: the same command reads every chunk again, and bills nothing twice
    third = four_days(site)
    assert third.exit_code == 0 and len(calls(site)) == 9 and len(api.events) == 4


def test_a_backfill_stops_when_the_api_is_down_and_resumes(site: Path, api: FakeApi) -> None:
    api.mode = "down"
    first = four_days(site)
    assert first.exit_code == 75, shown(first)
    assert "backfill stopped after chunk 1/4" in first.stderr
    assert len(calls(site)) == 1  # no more planning into an outbox nobody empties
    api.mode = "ok"
    second = four_days(site)
    assert second.exit_code == 0, shown(second)
    assert len(calls(site)) == 4 and len(api.events) == 4


def test_backfill_outcomes_are_recorded_apart_from_syncs(site: Path, api: FakeApi) -> None:
    (site / "capture.txt.fail-after").write_text("0")
    failed = four_days(site)
    assert failed.exit_code == 75
    (site / "capture.txt.fail-after").unlink()
    assert four_days(site).exit_code == 0
    with State.open(site / "state.db", readonly=True) as store:
        kinds = [(r["summary"].get("kind"), r["outcome"]) for r in store.recent_syncs()]
        history = sync_history(store, site / "state.db")
    assert kinds == [("backfill", "ok"), ("backfill", "failed")]
    # a backfill is no sync: the sync health is untouched by either
    assert history["failedInARow"] == 0 and history["lastSuccessAt"] is None
    assert not (site / "state.db.last-failure").exists()


def test_the_end_of_a_backfill_is_capped_at_now_minus_the_lag(site: Path, api: FakeApi) -> None:
    future = at(int(time.time()) + 3 * DAY)
    result = run(site, "backfill", "--start", at(D0), "--end", future, "--chunk", "2d")
    assert result.exit_code == 0, shown(result)
    assert "--end capped at now minus sacct.lag" in result.stderr
    # six days and some hours in chunks of two days: four calls, none wholly in the future
    assert len(calls(site)) == 4
    assert all(start_of(c) < at(int(time.time())) for c in calls(site))


def test_a_backfill_without_end_runs_to_now(site: Path, api: FakeApi) -> None:
    result = run(site, "backfill", "--start", at(D0), "--chunk", "3d", "--dry-run")
    assert result.exit_code == 0, shown(result)
    assert len(calls(site)) == 3 and "capped" not in result.stderr


def test_a_dry_backfill_of_a_saved_capture_runs_no_sacct(site: Path) -> None:
    result = run(
        site,
        "backfill",
        "--start",
        at(D0 + DAY),
        "--end",
        at(D0 + 3 * DAY),
        "--dry-run",
        "--sacct-file",
        str(site / "capture.txt"),
        "--output",
        "json",
    )
    assert result.exit_code == 0, shown(result)
    assert calls(site) == []
    events = json.loads(result.stdout)["events"]
    assert sorted(e["metadata"]["jobId"] for e in events) == ["101", "102"]
    assert not (site / "state.db").exists()


def test_quiet_backfills_print_no_progress(site: Path, api: FakeApi) -> None:
    result = four_days(site, "-q")
    assert result.exit_code == 0 and "backfill chunk" not in result.stderr


def test_a_dry_backfill_shows_each_chunk_as_it_is_read_and_a_long_run_once(site: Path) -> None:
    # A run of 2.5 days is returned by the windows of days 1, 2 and 3: planned once. Each
    # chunk's plan is handed on before the next chunk is read (nothing held for the period).
    # Mutants: preview returning one merged plan (the order below), forgetting every run after
    # each chunk (the long run billed three times), or keeping nothing across chunks at all.
    long_run = {
        **rows_per_day(1)[0],
        "JobID": "200",
        "End": str(D0 + 3600 + 5 * DAY // 2),
        "ElapsedRaw": str(5 * DAY // 2),
        "AllocTRES": "cpu=4,mem=1G,node=1,billing=4",
    }
    (site / "capture.txt").write_bytes(live_capture([*rows_per_day(4), long_run]))
    config = load_config(site / "config.yaml")
    order: list[tuple[str, int]] = []
    quantity: dict[str, Decimal] = {}
    period = backfill.Period(
        datetime.fromtimestamp(D0, UTC), datetime.fromtimestamp(D0 + 4 * DAY, UTC), DAY
    )
    with State.open(site / "state.db") as store:
        plans = backfill.preview(
            config,
            store,
            None,
            period,
            {},
            progress=lambda chunk: order.append(("read", chunk.number)),
            sleep=lambda _s: None,
        )
        for number, plan in enumerate(plans, 1):
            order.append(("shown", number))
            for event in plan.events:
                job = str(event.metadata["jobId"])
                quantity[job] = quantity.get(job, Decimal(0)) + event.quantity
    assert order == [(kind, n) for n in (1, 2, 3, 4) for kind in ("read", "shown")]
    assert quantity == {"100": 2, "101": 2, "102": 2, "103": 2, "200": 4 * Decimal(60)}
