"""Corrections (issue 9): a run slurmdbd now says used less than was billed is recorded, listed,
and only on request corrected on the API (over-billed events deleted, their valid part posted
again through the outbox). Pure parts, the state file, then the CLI against the emulator."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import api, events, ledger, pipeline
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.corrections import (
    Correction,
    Stretch,
    detect,
    plan_fix,
    record_from_json,
    record_json,
    replacements,
    stretches_from_json,
    stretches_json,
)
from slurm_tracker.models import JobRecord, ParseResult, SkuCharge
from slurm_tracker.segments import split
from slurm_tracker.state import SCHEMA_VERSION, CorrectionSeen, State
from slurm_tracker.state_schema import MIGRATIONS as _MIGRATIONS
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, Emulator
from tests.factories import live_capture, record, write_fake_sacct
from tests.test_state import V1_TABLES, _v1_file

UTC = timezone.utc
CPU = SkuCharge("CPU_HOUR", "cpu")
CONFIG = config_from_text(
    "cluster: box\naccounts: {map: {physics: physics}}\npartitions: {map: {compute: CPU_HOUR}}\n",
    "test",
)


def billed(
    rec: JobRecord,
    a: int,
    b: int,
    *,
    sku: str = "CPU_HOUR",
    allocation: str = "physics",
    n: int = 0,
    run: Optional[str] = None,
) -> ledger.BilledEvent:
    key = f"st1:{run or rec.run.text}:{a}-{b}:{sku}"
    parts = ledger.parse_event_key(key)
    assert parts is not None
    return ledger.BilledEvent(
        cost_id=f"id-{a}-{b}-{sku}-{allocation}-{n}",
        allocation=allocation,
        key=key,
        parts=parts,
        quantity=Decimal(b - a) / 900,
        started_at=None,
        ended_at=None,
        created_at=None,
        agent="",
    )


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("elapsed", "final", "billed_s", "found"),
    [
        (3600, True, 7200, True),  # an admin fixed a runaway job
        (0, True, 7140, True),  # `sacctmgr show runaway` sets End = Start: nothing used
        (7200, True, 7200, False),
        (9000, True, 7200, False),
        (3600, False, 7200, False),  # running: ElapsedRaw may still grow, nothing is recorded
        (3600, True, 0, False),
    ],
)
def test_detect_final_runs_below_what_was_billed(
    elapsed: int, final: bool, billed_s: int, found: bool
) -> None:
    rec = record(elapsed_s=elapsed, final=final)
    correction = detect(rec, billed_s, "physics", [CPU])
    assert (correction is not None) == found
    if correction is not None:
        assert (correction.billed_s, correction.actual_s) == (billed_s, elapsed)
        assert correction.stored().skus == ("CPU_HOUR",)
        assert correction.stored().allocations == ("physics",)


def test_a_pending_record_is_never_a_correction() -> None:
    assert detect(record(start_at=None, elapsed_s=0), 3600, "physics", [CPU]) is None


def test_the_plan_stage_returns_the_correction_and_says_so() -> None:
    shrunk = record(job_id="7", elapsed_s=3600)
    exact = record(job_id="8", elapsed_s=1800)
    longer = record(job_id="9", elapsed_s=5400)
    parsed = ParseResult(records=(shrunk, exact, longer), rejected=())
    reported = {shrunk.run: 7200, exact.run: 1800, longer.run: 3600}
    plan = pipeline.plan_usage(parsed, reported, CONFIG)
    (correction,) = plan.corrections
    assert isinstance(correction, Correction)
    assert (correction.run, correction.billed_s, correction.actual_s) == (shrunk.run, 7200, 3600)
    reasons = {s.job_id: s.reason for s in plan.skipped}
    assert "recorded as a correction" in reasons["7"]
    assert "7200 s already billed" in reasons["7"]
    assert "never taken back" not in reasons["7"]
    assert [e.metadata["jobId"] for e in plan.events] == ["9"]  # billed on from 3600 s
    assert dict(plan.final_seen) == {exact.run.text: 1800, longer.run.text: 5400}
    merged = pipeline.merge_plans([plan, plan])
    assert len(merged.corrections) == 2


def test_the_record_is_kept_with_what_its_events_carry() -> None:
    rec = record(job_id="12_3", QOS="normal", Comment="private", job_name="secret")
    rec = replace(rec, job_id_raw="4242", user="bob")
    kept = record_from_json(record_json(rec, ("qos",)))
    assert kept == replace(rec, job_name="", extra={"QOS": "normal"})
    with_name = record_from_json(record_json(rec, ("job_name",)))
    assert with_name.job_name == "secret" and with_name.extra == {}
    with pytest.raises(ValueError, match="not a record"):
        record_from_json('{"cluster": "box"}')


# ------------------------------------------------------------------------------ the fix

R = record(job_id="5", elapsed_s=3600)
OTHER = record(job_id="6", elapsed_s=3600)


def _stretches(fix_posts: tuple[Stretch, ...]) -> list[tuple[str, str, int, int]]:
    return [(s.allocation, s.sku, s.from_s, s.to_s) for s in fix_posts]


@pytest.mark.parametrize(
    ("held", "removed_before", "actual", "deleted", "posted"),
    [
        # one final event: deleted, its first hour posted again
        ([(0, 7200)], [], 3600, [(0, 7200)], [(0, 3600)]),
        # billed in steps while running: only the step reaching beyond is replaced
        ([(0, 900), (900, 1800), (1800, 7200)], [], 3600, [(1800, 7200)], [(1800, 3600)]),
        # a step ends exactly where slurmdbd now stops: it stays, nothing is posted
        ([(0, 3600), (3600, 7200)], [], 3600, [(3600, 7200)], []),
        # a runaway job fixed to End = Start: everything goes
        ([(0, 3600), (3600, 7140)], [], 0, [(0, 3600), (3600, 7140)], []),
        # an earlier attempt deleted [0, 7200) and stopped before posting
        ([], [(0, 7200)], 3600, [], [(0, 3600)]),
        # an earlier attempt deleted and posted: nothing left to do
        ([(0, 3600)], [(0, 7200)], 3600, [], []),
        # slurmdbd's seconds grew back after the deletion: all of it is posted again
        ([], [(0, 7200)], 9000, [], [(0, 7200)]),
        # nothing beyond: nothing to do
        ([(0, 1800), (1800, 3600)], [], 3600, [], []),
    ],
)
def test_plan_fix(
    held: list[tuple[int, int]],
    removed_before: list[tuple[int, int]],
    actual: int,
    deleted: list[tuple[int, int]],
    posted: list[tuple[int, int]],
) -> None:
    on_api = [billed(R, a, b) for a, b in held]
    before = [Stretch("physics", "CPU_HOUR", a, b) for a, b in removed_before]
    fix = plan_fix(R.run.text, actual, on_api, before)
    assert sorted((e.parts.from_s, e.parts.to_s) for e in fix.deletions) == deleted
    assert _stretches(fix.posts) == [("physics", "CPU_HOUR", a, b) for a, b in posted]
    assert set(before) <= set(fix.removed)
    assert fix.nothing_to_do == (not deleted and not posted)


def test_plan_fix_deletes_every_copy_and_posts_once() -> None:
    copies = [billed(R, 0, 7200, n=1), billed(R, 0, 7200, n=2)]
    fix = plan_fix(R.run.text, 3600, copies)
    assert len(fix.deletions) == 2
    assert _stretches(fix.posts) == [("physics", "CPU_HOUR", 0, 3600)]


def test_plan_fix_touches_only_the_run_and_keeps_allocations_and_skus_apart() -> None:
    on_api = [
        billed(R, 0, 7200),
        billed(R, 0, 7200, sku="GPU_HOUR"),
        billed(R, 0, 900, allocation="chemistry"),
        billed(R, 900, 7200, allocation="chemistry"),
        billed(OTHER, 0, 7200),  # another run: never touched
        billed(R, 0, 7200, run=f"other:{R.job_id_raw}:{int(R.submit_at.timestamp())}"),
    ]
    fix = plan_fix(R.run.text, 1800, on_api)
    assert {e.cost_id for e in fix.deletions} == {
        e.cost_id for e in on_api[:4] if e.parts.to_s > 1800
    }
    assert _stretches(fix.posts) == [
        ("chemistry", "CPU_HOUR", 900, 1800),
        ("physics", "CPU_HOUR", 0, 1800),
        ("physics", "GPU_HOUR", 0, 1800),
    ]
    assert stretches_from_json(stretches_json(fix.removed)) == list(fix.removed)


def test_replacements_are_keyed_cut_at_month_starts_and_sized_by_the_tres() -> None:
    start = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    rec = record(job_id="77", start_at=start, elapsed_s=5400, cpu=4)
    planned = replacements(
        rec,
        [Stretch("physics", "CPU_HOUR", 0, 5400)],
        {("physics", "CPU_HOUR"): "cpu"},
        agent="host/abc",
    )
    assert [e.event_key for e in planned] == [
        f"st1:{rec.run.text}:0-3600:CPU_HOUR",
        f"st1:{rec.run.text}:3600-5400:CPU_HOUR",
    ]
    assert [e.quantity for e in planned] == [Decimal(4), Decimal(2)]
    assert planned[1].started_at == datetime(2026, 2, 1, tzinfo=UTC)
    assert all(e.metadata["correction"] is True for e in planned)
    assert planned[0].metadata["agent"] == "host/abc"
    with pytest.raises(KeyError):
        replacements(rec, [Stretch("physics", "GPU_HOUR", 0, 60)], {})


# ------------------------------------------------------------------------------ the state file

NOW = datetime(2026, 3, 11, tzinfo=UTC)


def seen(run: str = "box:1:100", billed_s: int = 7200, actual_s: int = 3600) -> CorrectionSeen:
    rec = record(job_id=run.split(":")[1], elapsed_s=actual_s)
    return CorrectionSeen(
        run, "1", ("physics",), ("CPU_HOUR",), billed_s, actual_s, record_json(rec)
    )


def commit(
    store: State, *found: CorrectionSeen, final_seen: Optional[dict[str, int]] = None
) -> None:
    store.commit_plan([], [], NOW, corrections=list(found), final_seen=final_seen)


def test_corrections_open_are_seen_again_applied_and_reopened(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store:
        progress = events_with_progress(store, "box:1:100", 7200)
        commit(store, seen())
        commit(store, seen(actual_s=3000))
        (row,) = store.corrections()
        assert (row.status, row.times_seen, row.actual_s, row.billed_s) == ("open", 2, 3000, 7200)
        assert store.correction_count() == 1
        assert store.correction_applied("box:1:100", NOW)
        assert not store.correction_applied("box:1:100", NOW)  # not open any more
        assert store.reported([progress]) == {progress: 3000}  # progress went down
        assert store.corrections() == []
        (row,) = store.corrections(include_closed=True)
        assert row.status == "applied" and row.resolved_at == NOW
        commit(store, seen(billed_s=3000, actual_s=1000))  # even less: open again
        (row,) = store.corrections()
        assert (row.status, row.actual_s, row.resolved_at) == ("open", 1000, None)


def test_dismissed_corrections_stay_dismissed_until_the_numbers_change(tmp_path: Path) -> None:
    with State.open(tmp_path / "s.db") as store:
        commit(store, seen())
        assert store.dismiss_corrections(["box:1:100"], "on purpose", NOW) == 1
        commit(store, seen())
        (row,) = store.corrections(include_closed=True)
        assert (row.status, row.note, row.times_seen) == ("dismissed", "on purpose", 2)
        commit(store, seen(actual_s=1800))
        assert store.corrections()[0].status == "open"


def test_a_run_seen_whole_again_dismisses_its_correction_unless_deletion_began(
    tmp_path: Path,
) -> None:
    with State.open(tmp_path / "s.db") as store:
        commit(store, seen("box:1:100"), seen("box:2:100"))
        store.correction_removing("box:2:100", stretches_json([Stretch("p", "C", 0, 7200)]), NOW)
        assert store.dismiss_corrections(["box:2:100"], "no", NOW) == 0  # must be applied
        commit(store, final_seen={"box:1:100": 7200, "box:2:100": 7200, "box:3:100": 60})
        rows = {r.run: r for r in store.corrections(include_closed=True)}
        assert rows["box:1:100"].status == "dismissed"
        assert "no less than what was billed" in rows["box:1:100"].note
        assert (rows["box:2:100"].status, rows["box:2:100"].actual_s) == ("open", 7200)


def events_with_progress(store: State, run: str, seconds: int) -> Any:
    """A progress row of ``seconds`` for ``run`` (box:<job>:<submit>), through a plan."""
    _cluster, job, submit = run.split(":")
    rec = record(job_id=job, elapsed_s=seconds, submit_at=datetime.fromtimestamp(int(submit), UTC))
    planned = events.plan(split(rec, 0, seconds), "physics", [CPU])
    store.commit_plan(planned, [events.request_body(e) for e in planned], NOW)
    return rec.run


def _v2_file(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """A state file of schema 2, as version 2 wrote it, with rows in every table."""
    _v1_file(path)
    conn = sqlite3.connect(path)
    for sql in _MIGRATIONS[2]:
        conn.execute(sql)
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    conn.execute("PRAGMA application_id = 1397511250")
    conn.execute(
        "INSERT INTO quarantine VALUES ('box:9:1', '9', 'End before Start', 'job 9', 1, 2, 3, NULL)"
    )
    conn.commit()
    tables = (*V1_TABLES, "quarantine")
    rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    conn.close()
    return rows


def test_migration_from_schema_2_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    before = _v2_file(path)
    raw = path.read_bytes()
    with State.open(path, readonly=True) as store:  # a dry run reads it as it is
        assert store.corrections() == [] and store.correction_count() == 0
        assert store.correction("box:1:100") is None
        assert store.quarantine_count() == 1
    assert path.read_bytes() == raw
    with State.open(path) as store:
        commit(store, seen())
        assert store.correction_count() == 1
    assert SCHEMA_VERSION == 4
    conn = sqlite3.connect(path)
    after = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in before}
    assert {t: rows for t, rows in after.items() if t != "meta"} == {
        t: rows for t, rows in before.items() if t != "meta"
    }
    meta_after = {row[0]: row[1] for row in after["meta"]}
    meta_before = {row[0]: row[1] for row in before["meta"]}
    assert meta_after == {**meta_before, "schema_version": "4"}
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"corrections", "corrections_status", "quarantine", "outbox_status"} <= names
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE corrections SET status='bogus'")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


# ------------------------------------------------------------------------------ CLI + emulator

NOW_S = int(time.time())
T = (NOW_S // 60 - 300) * 60  # five hours ago


def job(
    number: int, elapsed: int, *, running: bool = False, end: Optional[int] = None
) -> dict[str, str]:
    start = T + number * 60
    return {
        "JobID": str(number),
        "Account": "physics",
        "Partition": "compute",
        "Submit": str(start - 30),
        "Start": str(start),
        "End": "Unknown" if running else str(end if end is not None else start + elapsed),
        "ElapsedRaw": str(elapsed),
        "State": "RUNNING" if running else "COMPLETED",
        "AllocTRES": "billing=2,cpu=2,mem=1G,node=1",
    }


class Site:
    """A config, a fake sacct serving a capture, a state file and the emulator."""

    def __init__(self, root: Path, emulator: Emulator, extra: str = "") -> None:
        self.root = root / "site"
        self.root.mkdir(mode=0o700)
        self.emulator = emulator
        self.capture = self.root / "capture.txt"
        self.capture.write_bytes(live_capture([]))
        sacct = write_fake_sacct(self.root / "sacct", self.capture)
        self.state = self.root / "state" / "state.db"
        self.config = self.root / "config.yaml"
        self.config.write_text(
            "cluster: box\n"
            f"state_file: {self.state}\n"
            "reporting_interval: 10m\n"
            f"api: {{organization: test-org, url: '{emulator.base_url}', max_attempts: 2, "
            "max_retry_time: 2s}\n"
            f"sacct: {{path: '{sacct}', lag: 1m, backfill_pause: 0s}}\n"
            "accounts: {map: {physics: physics}}\n"
            "partitions: {map: {compute: CPU_HOUR}}\n" + extra
        )

    def jobs(self, *rows: dict[str, str]) -> None:
        self.capture.write_bytes(live_capture(list(rows)))

    def run(self, *args: str, code: Optional[int] = 0) -> Result:
        result = cli_runner().invoke(
            main, [*args, "--config", str(self.config)], env={"PW_API_KEY": DEFAULT_API_KEY}
        )
        if code is not None:
            assert result.exit_code == code, shown(result)
        return result

    def sync(self, code: int = 0) -> Any:
        return json.loads(self.run("sync", "--output", "json", code=code).stdout)

    def listed(self, *args: str) -> list[dict[str, Any]]:
        return json.loads(self.run("corrections", "list", "--output", "json", *args).stdout)  # type: ignore[no-any-return]

    def changes(self) -> list[tuple[str, str]]:
        """The API's writes so far (method, path)."""
        return [
            (r["method"], r["path"])
            for r in self.emulator.requests()
            if r["method"] in ("POST", "DELETE")
        ]


def tiling(emulator: Emulator) -> dict[str, tuple[int, Decimal]]:
    """Per job: elapsed seconds billed and the quantity; fails unless the stretches of our
    keys tile [0, n) exactly once and no key is accepted twice."""
    spans: dict[str, list[tuple[int, int, Decimal]]] = {}
    keys = Counter(e.event_key for e in emulator.events())
    assert max(keys.values(), default=1) == 1, keys
    for event in emulator.events():
        parts = ledger.parse_event_key(event.event_key or "")
        if parts is None or parts.cluster != "box":
            continue
        spans.setdefault(parts.job_id_raw, []).append((parts.from_s, parts.to_s, event.quantity))
    out = {}
    for job_id, pieces in spans.items():
        pieces.sort()
        assert pieces[0][0] == 0, pieces
        for (_, end, _q), (start, _, _q2) in zip(pieces, pieces[1:]):
            assert end == start, f"job {job_id}: {pieces} overlap or leave a gap"
        out[job_id] = (pieces[-1][1], sum((p[2] for p in pieces), Decimal(0)))
    return out


@pytest.fixture
def emulator() -> Any:
    with Emulator(max_page_size=2) as running:  # reads go past one page
        yield running


@pytest.fixture
def site(tmp_path: Path, emulator: Emulator) -> Site:
    return Site(tmp_path, emulator)


def bill_then_shrink(site: Site, *others: dict[str, str]) -> None:
    """Job 1 billed final at 2 h; then slurmdbd says it ran 1 h."""
    site.jobs(job(1, 7200), *others)
    assert site.sync()["posted"] == 1 + len(others)
    assert tiling(site.emulator)["1"] == (7200, Decimal(4))
    site.jobs(job(1, 3600), *others)


def test_a_shrunk_run_is_listed_and_nothing_changes_on_the_api_without_apply(site: Site) -> None:
    bill_then_shrink(site)
    dry = json.loads(site.run("sync", "--dry-run", "--output", "json").stdout)
    (skip,) = dry["skipped"]
    assert "recorded as a correction" in skip["reason"]
    assert site.listed() == []  # a dry run records nothing
    before = site.emulator.events()
    site.sync()
    site.sync()
    (row,) = site.listed()
    assert {k: row[k] for k in ("jobId", "status", "billedSeconds", "slurmdbdSeconds")} == {
        "jobId": "1",
        "status": "open",
        "billedSeconds": 7200,
        "slurmdbdSeconds": 3600,
    }
    assert (row["allocations"], row["skus"], row["timesSeen"]) == (["physics"], ["CPU_HOUR"], 2)
    assert row["firstSeen"] <= row["lastSeen"]
    assert "open" in site.run("corrections", "list").stdout
    status = json.loads(site.run("status", "--output", "json").stdout)
    assert status["openCorrections"] == 1
    assert "corrections     1 open" in site.run("status").stdout
    # the dry apply reads the API and says what it would do
    preview = site.run("corrections", "apply")
    assert "would delete" in preview.stdout and ":0-7200:CPU_HOUR" in preview.stdout
    assert ":0-3600:CPU_HOUR" in preview.stdout and "pass --yes" in preview.stdout
    assert site.emulator.events() == before
    assert site.listed()[0]["status"] == "open"


def test_apply_yes_leaves_exactly_the_new_elapsed_and_a_second_apply_does_nothing(
    site: Site,
) -> None:
    bill_then_shrink(site, job(2, 7200))
    site.sync()
    applied = site.run("corrections", "apply", "--yes", "--output", "json")
    doc = json.loads(applied.stdout)
    assert (doc["done"], doc["applied"], doc["open"]) == (True, 1, 0)
    assert tiling(site.emulator) == {"1": (3600, Decimal(2)), "2": (7200, Decimal(4))}
    assert site.listed() == []
    (row,) = site.listed("--all")
    assert row["status"] == "applied" and row["resolvedAt"]
    with State.open(site.state, readonly=True) as store:
        run = record_from_json(store.corrections(include_closed=True)[0].record).run
        progress = store.progress(run)
        assert progress is not None and progress.reported_s == 3600  # set down explicitly
        dropped = store.outbox(("dropped",))
        assert [r.event_key.endswith(":0-7200:CPU_HOUR") for r in dropped] == [True]
    writes = site.changes()
    again = site.run("corrections", "apply", "--yes")
    assert "no open corrections" in again.stdout
    assert site.changes() == writes
    out = site.sync()  # the next sync neither bills nor records anything
    assert out["planned"] == 0 and site.listed() == []
    assert site.listed("--all")[0]["timesSeen"] == 1
    assert tiling(site.emulator) == {"1": (3600, Decimal(2)), "2": (7200, Decimal(4))}
    # reconcile, reading what slurmdbd says now, finds nothing wrong
    start = datetime.fromtimestamp(T, UTC)
    check = site.run(
        "reconcile",
        "--sacct-file",
        str(site.capture),
        "--start",
        events.rfc3339(start),
        "--end",
        events.rfc3339(datetime.fromtimestamp(NOW_S - 60, UTC)),
    )
    assert "0 discrepancies" in check.stdout


def test_with_apply_true_a_sync_corrects_after_delivering(
    tmp_path: Path, emulator: Emulator
) -> None:
    site = Site(tmp_path, emulator, "corrections: {apply: true}\n")
    bill_then_shrink(site)
    site.sync()
    assert tiling(emulator) == {"1": (3600, Decimal(2))}
    assert site.listed("--all")[0]["status"] == "applied"
    writes = site.changes()
    site.sync()
    assert site.changes() == writes


def test_a_runaway_job_fixed_to_end_at_start_is_taken_back_whole(site: Site) -> None:
    # billed while slurmdbd showed it running; `sacctmgr show runaway` then sets End = Start
    site.jobs(job(1, 7200, running=True))
    site.sync()
    assert tiling(site.emulator)["1"][0] == 7140  # the last minute held back (sacct.lag)
    site.jobs(job(1, 0, end=T + 60))
    site.sync()
    assert site.listed()[0]["slurmdbdSeconds"] == 0
    site.run("corrections", "apply", "--yes", "1")
    assert tiling(site.emulator) == {}
    assert site.listed("--all")[0]["status"] == "applied"
    assert site.sync()["planned"] == 0


def test_a_backfill_records_corrections_too(site: Site) -> None:
    bill_then_shrink(site)
    start = events.rfc3339(datetime.fromtimestamp(T, UTC))
    site.run(
        "backfill",
        "--start",
        start,
        "--end",
        events.rfc3339(datetime.fromtimestamp(NOW_S - 120, UTC)),
    )
    assert [r["slurmdbdSeconds"] for r in site.listed()] == [3600]


def test_a_failed_delete_leaves_it_open_and_a_later_apply_completes_it(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    site.emulator.add_fault({"kind": "status", "status": 503, "method": "DELETE", "times": None})
    failed = site.run("corrections", "apply", "--yes", code=4)
    assert "NOT applied" in failed.stdout and "deleting its events" in failed.stdout
    assert tiling(site.emulator) == {"1": (7200, Decimal(4))}  # nothing changed
    (row,) = site.listed()
    assert row["status"] == "open" and row["attempts"] == 1 and "503" in row["note"]
    site.emulator.clear_faults()
    site.run("corrections", "apply", "--yes")
    assert tiling(site.emulator) == {"1": (3600, Decimal(2))}


def test_a_delete_that_landed_unanswered_is_completed_from_the_state(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    # the API deletes, then every answer is lost: as if the agent died after the deletion
    site.emulator.add_fault({"kind": "reset", "commit": True, "method": "DELETE", "times": None})
    site.run("corrections", "apply", "--yes", code=4)
    assert tiling(site.emulator) == {}  # deleted, nothing posted yet
    site.emulator.clear_faults()
    site.sync()  # a sync in between sees the run again: the correction keeps what was deleted
    (row,) = site.listed()
    assert row["status"] == "open"
    site.run("corrections", "apply", "--yes")
    assert tiling(site.emulator) == {"1": (3600, Decimal(2))}
    assert site.listed("--all")[0]["status"] == "applied"


def test_a_failed_post_is_delivered_later_and_then_the_correction_completes(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    site.emulator.add_fault({"kind": "status", "status": 503, "method": "POST", "times": None})
    failed = site.run("corrections", "apply", "--yes", code=4)
    assert "not on the API yet" in failed.stdout
    assert tiling(site.emulator) == {}
    site.emulator.clear_faults()
    assert site.sync()["posted"] == 1  # the outbox delivers it, as any event
    assert tiling(site.emulator) == {"1": (3600, Decimal(2))}
    assert site.listed()[0]["status"] == "open"  # apply is off: completed on request
    writes = site.changes()
    site.run("corrections", "apply", "--yes")
    assert site.changes() == writes  # nothing left to change on the API
    assert site.listed("--all")[0]["status"] == "applied"
    assert tiling(site.emulator) == {"1": (3600, Decimal(2))}


def test_only_our_events_of_the_run_are_ever_deleted(site: Site) -> None:
    bill_then_shrink(site, job(2, 7200))
    rec_key = next(
        str(e.event_key)
        for e in site.emulator.events()
        if getattr(ledger.parse_event_key(e.event_key or ""), "job_id_raw", "") == "1"
    )
    parts = ledger.parse_event_key(rec_key)
    assert parts is not None
    client = api.AllocationsClient(site.emulator.base_url, "test-org", DEFAULT_API_KEY)
    body = {
        "sku": "CPU_HOUR",
        "quantity": 1.0,
        "startedAt": events.rfc3339(datetime.fromtimestamp(T + 60, UTC)),
        "endedAt": events.rfc3339(datetime.fromtimestamp(T + 7260, UTC)),
    }
    foreign = [
        {"note": f"manual credit for {rec_key}"},  # mentions our key, but is not ours
        {"eventKey": rec_key.replace("st1:box:", "st1:other:")},  # another cluster
        {"eventKey": f"st1:{parts.run}:garbage"},
    ]
    for meta in foreign:
        client.post_usage("physics", {**body, "metadata": meta})
    ours = ledger.parse_event_key
    kept = {
        e.id
        for e in site.emulator.events()
        if getattr(ours(e.event_key or ""), "run", None) != parts.run
    }
    assert len(kept) == 4  # job 2's event and the three foreign ones
    site.sync()
    site.run("corrections", "apply", "--yes")
    assert kept <= {e.id for e in site.emulator.events()}
    assert tiling(site.emulator)["1"] == (3600, Decimal(2))
    assert tiling(site.emulator)["2"] == (7200, Decimal(4))


def test_slurmdbd_saying_the_whole_again_dismisses_the_open_correction(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    site.jobs(job(1, 7200))
    site.sync()
    (row,) = site.listed("--all")
    assert row["status"] == "dismissed" and "no less than" in row["note"]
    assert "no open corrections" in site.run("corrections", "apply", "--yes").stdout
    assert tiling(site.emulator) == {"1": (7200, Decimal(4))}


def test_dismiss_leaves_the_api_alone(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    assert "1 correction dismissed" in site.run("corrections", "dismiss", "1").stdout
    site.sync()  # seen again with the same numbers: stays dismissed
    assert site.listed() == []
    assert site.listed("--all")[0]["status"] == "dismissed"
    site.run("corrections", "apply", "--yes")
    assert tiling(site.emulator) == {"1": (7200, Decimal(4))}


def test_a_run_with_an_unsettled_event_waits(site: Site) -> None:
    bill_then_shrink(site)
    site.sync()
    with State.open(site.state) as store:  # an event of the run still pending in the outbox
        row = store.corrections()[0]
        rec = record_from_json(row.record)
        planned = events.plan(split(replace(rec, elapsed_s=9000), 7200, 9000), "physics", [CPU])
        store.commit_plan(
            planned, [events.request_body(e) for e in planned], NOW, held=[planned[0].event_key]
        )
    result = site.run("corrections", "apply", "--yes", code=4)
    assert "held in the outbox" in result.stdout
    assert tiling(site.emulator) == {"1": (7200, Decimal(4))}


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=9999), max_size=6, unique=True),
    billed_s=st.integers(min_value=1, max_value=10000),
    actual=st.integers(min_value=0, max_value=10000),
)
def test_a_fix_leaves_a_tiling_of_what_slurmdbd_says_whatever_step_stopped(
    cuts: list[int], billed_s: int, actual: int
) -> None:
    actual = min(actual, billed_s - 1)  # a correction: below what was billed
    bounds = [0, *sorted(c for c in cuts if c < billed_s), billed_s]
    on_api = [billed(R, a, b) for a, b in zip(bounds, bounds[1:])]

    def after(fix_: Any, before: list[ledger.BilledEvent]) -> list[ledger.BilledEvent]:
        gone = {e.cost_id for e in fix_.deletions}
        return [e for e in before if e.cost_id not in gone] + [
            billed(R, s.from_s, s.to_s, n=9) for s in fix_.posts
        ]

    fix = plan_fix(R.run.text, actual, on_api)
    done = after(fix, on_api)
    spans = sorted((e.parts.from_s, e.parts.to_s) for e in done)
    if actual == 0:
        assert spans == []
    else:  # [0, actual) once: no gap, no overlap
        assert spans[0][0] == 0 and spans[-1][1] == actual
        assert all(end == start for (_, end), (start, _) in zip(spans, spans[1:]))
    # stopped after the deletion: the next attempt posts the same, from what the state kept
    gone = {e.cost_id for e in fix.deletions}
    resumed = plan_fix(
        R.run.text, actual, [e for e in on_api if e.cost_id not in gone], fix.removed
    )
    assert resumed.posts == fix.posts and not resumed.deletions
    # finished: a second apply has nothing to do
    assert plan_fix(R.run.text, actual, done, fix.removed).nothing_to_do
