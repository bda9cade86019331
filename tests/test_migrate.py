"""slurm-tracker migrate config|state: switching from the older Go agent (issue 13).

The old agent's state and config are built by tests/old_agent.py from the schema in the issue;
slurmdbd is a saved capture in the live format (tests.factories.live_capture)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import Result

from slurm_tracker import api, ledger, pipeline
from slurm_tracker import reconcile as reconciling
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.migrate_config import old_config_from, to_yaml
from slurm_tracker.models import JobRecord
from slurm_tracker.state import State
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, Emulator
from tests.factories import live_capture
from tests.old_agent import (
    OldRow,
    event_body,
    old_config,
    write_old_config,
    write_old_state,
    write_raw_old_state,
)

UTC = timezone.utc
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
H = 3600

CONFIG = """\
cluster: box
state_file: {state}
reporting_interval: 1m
sacct: {{overlap: 1h, lag: 1m{clusters}}}
accounts: {{map: {{physics: physics, chemistry: chemistry}}}}
partitions: {{map: {{compute: CPU_HOUR}}}}
"""


def ago(seconds: int) -> datetime:
    return NOW - timedelta(seconds=seconds)


def epoch(at: datetime) -> str:
    return str(int(at.timestamp()))


def sacct_row(
    job: str,
    start: datetime,
    elapsed: int,
    *,
    running: bool = False,
    raw: Optional[str] = None,
    submit: Optional[datetime] = None,
    cpus: int = 4,
    state: str = "COMPLETED",
    cluster: str = "box",
) -> dict[str, str]:
    return {
        "Cluster": cluster,
        "JobID": job,
        "JobIDRaw": raw or job,
        "Account": "physics",
        "Partition": "compute",
        "Submit": epoch(submit or start - timedelta(minutes=1)),
        "Start": epoch(start),
        "End": "Unknown" if running else epoch(start + timedelta(seconds=elapsed)),
        "ElapsedRaw": str(elapsed),
        "State": "RUNNING" if running else state,
        "AllocTRES": f"cpu={cpus},mem=4G,node=1,billing={cpus}",
    }


# The old agent's view and slurmdbd's, cut over about an hour after its last report.
R101 = sacct_row("101", ago(3 * H), 3 * H, running=True)  # running; billed 2 h
R102 = sacct_row("102", ago(5 * H), 3 * H)  # completed; billed in full
R103_1 = sacct_row("103", ago(6 * H), 2 * H, state="REQUEUED", submit=ago(6 * H + 60))
R103_2 = sacct_row("103", ago(int(3.5 * H)), int(3.5 * H), running=True, submit=ago(4 * H))
R106 = sacct_row("104_2", ago(2 * H), 2 * H, running=True, raw="106")  # array task 104_2
R107 = sacct_row("107", ago(1800), 1800, running=True)  # started after the cutover
R108 = sacct_row("108", ago(10 * H), 2 * H)  # ended before the floor, never billed by the old
ROWS = [R101, R102, R103_1, R103_2, R106, R107, R108]
OLD = [
    OldRow(101, ago(3 * H), 2 * H, cpus=4),
    OldRow(102, ago(5 * H), 3 * H, cpus=4, ended_at=ago(2 * H)),
    OldRow(103, ago(int(3.5 * H)), 1 * H, cpus=4),  # reported on the requeued run
    OldRow(106, ago(2 * H), 1 * H, cpus=4),
    OldRow(90, ago(40 * H), 600, cpus=1, ended_at=ago(39 * H)),  # long ago: ignored
]
# The floor: the earliest end of what the old agent billed of a run with usage left (job 103's
# second run, 1 h into it, 2.5 h ago).
FLOOR = ago(int(2.5 * H))


class Site:
    def __init__(self, tmp: Path, clusters: str = "") -> None:
        self.dir = tmp
        self.state = tmp / "state" / "state.db"
        self.config = tmp / "config.yaml"
        self.config.write_text(CONFIG.format(state=self.state, clusters=clusters))
        self.capture = tmp / "capture.txt"
        self.capture.write_bytes(live_capture(ROWS))
        self.old_state = write_old_state(tmp / "old.db", OLD)

    def run(self, *args: str) -> Result:
        return cli_runner().invoke(main, list(args), catch_exceptions=False)

    def migrate(self, *args: str, old: Optional[Path] = None) -> Result:
        return self.run(
            "migrate",
            "state",
            str(old or self.old_state),
            "--config",
            str(self.config),
            "--sacct-file",
            str(self.capture),
            *args,
        )

    def plan(self) -> dict[str, Any]:
        result = self.run(
            "sync",
            "--dry-run",
            "--config",
            str(self.config),
            "--sacct-file",
            str(self.capture),
            "--output",
            "json",
        )
        assert result.exit_code == 0, shown(result)
        return dict(json.loads(result.stdout))

    def progress(self) -> dict[str, tuple[int, int]]:
        conn = sqlite3.connect(str(self.state))
        try:
            return {
                r: (s, f) for r, s, f in conn.execute("SELECT run, reported_s, final FROM progress")
            }
        finally:
            conn.close()


def run_text(row: dict[str, str]) -> str:
    return f"{row['Cluster']}:{row['JobIDRaw']}:{row['Submit']}"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# ------------------------------------------------------------------------------ migrate state


def test_migrate_state_carries_what_the_old_agent_billed(site: Site) -> None:
    result = site.migrate()
    assert result.exit_code == 0, shown(result)
    assert site.progress() == {
        run_text(R101): (2 * H, 0),
        run_text(R102): (3 * H, 1),
        run_text(R103_2): (1 * H, 0),
        run_text(R103_1): (2 * H, 1),  # the earlier run of the requeued job: billed in full
        run_text(R106): (1 * H, 0),  # the array task, by its JobIDRaw
    }
    with State.open(site.state, readonly=True) as store:
        assert store.floor_at() == FLOOR
        assert store.high_water_at() == FLOOR
        note = store.migration()
    assert note is not None and note["runs"] == 5
    assert "the first sync bills elapsed 7200-10800 s = 4.000000 core-hours" in result.stdout


def test_the_first_sync_bills_only_the_rest(site: Site) -> None:
    assert site.migrate().exit_code == 0
    plan = site.plan()
    by_job: dict[str, list[tuple[int, int]]] = {}
    for event in plan["events"]:
        meta = event["metadata"]
        by_job.setdefault(meta["jobId"], []).append((meta["elapsedFrom"], meta["elapsedTo"]))
    lag = 60  # the last sacct.lag seconds of a running run wait for the next sync
    assert by_job == {
        "101": [(2 * H, 3 * H - lag)],
        "103": [(1 * H, int(3.5 * H) - lag)],
        "104_2": [(1 * H, 2 * H - lag)],
        "107": [(0, 1800 - lag)],  # new since the cutover: in full
    }
    reasons = {s["jobId"]: s["reason"] for s in plan["skipped"]}
    assert "billing floor" in reasons["108"]


def test_without_the_migration_the_first_sync_bills_twice(site: Site) -> None:
    """The guard the test above relies on: without migrated progress the old part is billed."""
    plan = site.plan()
    assert any(
        e["metadata"]["jobId"] == "101" and e["metadata"]["elapsedFrom"] == 0
        for e in plan["events"]
    )


def test_dry_run_writes_nothing(site: Site) -> None:
    result = site.migrate("--dry-run", "--output", "json")
    assert result.exit_code == 0, shown(result)
    doc = json.loads(result.stdout)
    assert doc["written"] is False and doc["floor"] == FLOOR.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert {r["oldJobId"] for r in doc["runs"]} == {101, 102, 103, 106}
    assert not site.state.parent.exists()


def test_a_used_state_file_is_refused(site: Site) -> None:
    assert site.migrate().exit_code == 0
    before = site.state.read_bytes()
    result = site.migrate()
    assert result.exit_code == 3, shown(result)
    assert "already been used" in shown(result)
    assert site.state.read_bytes() == before


def test_unknown_job_ids_are_listed(site: Site) -> None:
    write_old_state(site.old_state.with_name("more.db"), [*OLD, OldRow(555, ago(2 * H), 600)])
    result = site.migrate(old=site.old_state.with_name("more.db"))
    assert result.exit_code == 0, shown(result)
    assert "not found: job 555" in result.stdout
    assert "no run of JobIDRaw 555" in result.stdout


def test_a_reused_job_id_stops_it(site: Site) -> None:
    # the old row says 2 h billed by 10 minutes ago; the run of that id slurmdbd has started
    # 30 minutes ago: the id was reused (wrapped), the row mixes two jobs
    site.capture.write_bytes(live_capture([*ROWS, sacct_row("109", ago(1800), 1800, running=True)]))
    old = write_old_state(
        site.dir / "wrapped.db",
        [*OLD, OldRow(109, ago(2 * H + 600), 2 * H, cpus=4)],
    )
    result = site.migrate(old=old)
    assert result.exit_code == 3, shown(result)
    assert "job 109: reused job id" in shown(result)
    assert "--skip 109" in shown(result)
    assert "nothing was written" in shown(result)
    assert not site.state.exists()
    result = site.migrate("--skip", "109", old=old)
    assert result.exit_code == 0, shown(result)
    assert run_text(sacct_row("109", ago(1800), 1800)) not in site.progress()


def test_an_ambiguous_job_id_stops_it(tmp_path: Path) -> None:
    site = Site(tmp_path, clusters=", clusters: [box, other]")
    site.capture.write_bytes(live_capture([*ROWS, {**R101, "Cluster": "other"}]))
    result = site.migrate()
    assert result.exit_code == 3, shown(result)
    assert "job 101: ambiguous" in shown(result)
    assert not site.state.exists()


def test_a_first_sync_start_after_the_cutover_stops_it(tmp_path: Path) -> None:
    site = Site(tmp_path, clusters=f', first_sync_start: "{ago(H):%Y-%m-%dT%H:%M:%SZ}"')
    result = site.migrate()
    assert result.exit_code == 3, shown(result)
    assert "remove sacct.first_sync_start" in shown(result)


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE jobs (id INTEGER)")
    conn.commit()
    conn.close()


def _truncated(path: Path) -> None:
    write_old_state(path, [OldRow(i, ago(H), 60) for i in range(1, 400)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(b""), "not a SQLite database (empty)"),
        (lambda p: p.write_bytes(b"job_id,elapsed\n1,2\n"), "not a SQLite database"),
        (_foreign, "no table job_states"),
        (_truncated, "cannot be read"),
        (
            lambda p: write_raw_old_state(p, [(5, -10, 1_700_000_000, 1.0, 0)]),
            "last_reported_elapsed -10",
        ),
        (
            lambda p: write_raw_old_state(p, [(6, 10, 4_000_000_000, 1.0, 0)]),
            "last_reported_at 4000000000",
        ),
        (
            lambda p: write_raw_old_state(p, [(7, "ten", 1_700_000_000, 1.0, 0)]),
            "last_reported_elapsed 'ten'",
        ),
    ],
    ids=["empty", "csv", "foreign", "truncated", "negative", "future", "text"],
)
def test_a_corrupt_old_state_stops_it(site: Site, make: Any, words: str) -> None:
    bad = site.dir / "bad.db"
    make(bad)
    result = site.migrate(old=bad)
    assert result.exit_code == 3, shown(result)
    assert words in shown(result)
    assert f"old agent state {bad}" in shown(result)
    assert "Nothing was written" in shown(result)
    assert not site.state.exists()


# ------------------------------------------------------------------------------ migrate config


def test_migrate_config_writes_a_config_check_accepts(tmp_path: Path) -> None:
    old = write_old_config(
        tmp_path / "config.json",
        old_config(
            {"compute": "CPU_HOUR", "gpu": "GPU_CORE_HOUR"},
            {"physics": "physics-2026", "chemistry": "chem"},
            default_sku="CPU_HOUR",
            default_allocation="general",
        ),
    )
    target = tmp_path / "config.yaml"
    result = cli_runner().invoke(
        main,
        [
            "migrate",
            "config",
            str(old),
            "--file",
            str(target),
            "--cluster",
            "box",
            "--organization",
            "acme",
        ],
    )
    assert result.exit_code == 0, shown(result)
    assert "not carried over: the API key" in result.stderr
    config = config_from_text(target.read_text(), "migrated")
    assert config.cluster == "box" and config.api.organization == "acme"
    assert dict(config.accounts.exact) == {"physics": "physics-2026", "chemistry": "chem"}
    assert config.accounts.default == "general"
    assert {p: [(c.sku, c.metric) for c in cs] for p, cs in config.partitions.exact.items()} == {
        "compute": [("CPU_HOUR", "cpu")],
        "gpu": [("GPU_CORE_HOUR", "cpu")],
    }
    assert [(c.sku, c.metric) for c in config.partitions.default] == [("CPU_HOUR", "cpu")]
    text = target.read_text()
    assert text.startswith("# Migrated from the Go slurm-tracker config")
    (tmp_path / "state").mkdir(mode=0o700)
    check = cli_runner().invoke(
        main, ["check", "--config", str(target), "--state", str(tmp_path / "state" / "s.db")]
    )
    assert check.exit_code == 0, shown(check)
    again = cli_runner().invoke(
        main, ["migrate", "config", str(old), "--file", str(target), "--cluster", "box"]
    )
    assert again.exit_code == 2 and "exists" in shown(again)


@pytest.mark.parametrize(
    "doc, words",
    [
        (old_config({}, {}, lookbackMinutes=30), "unknown key 'lookbackMinutes'"),
        (old_config({}, {}, defaultSKU="X"), "(did you mean 'defaultSku'?)"),
        ({"partition": [{"name": "a", "sku": "X", "metric": "gpu"}]}, "unknown key 'metric'"),
        ({"account": [{"name": "a"}]}, "account[0].allocation: a non-empty string"),
        ({"partition": "compute"}, "partition: a list of"),
        ([1, 2], "a JSON object, not a list"),
    ],
)
def test_a_bad_old_config_stops_it(tmp_path: Path, doc: Any, words: str) -> None:
    old = write_old_config(tmp_path / "config.json", doc)
    target = tmp_path / "config.yaml"
    result = cli_runner().invoke(
        main, ["migrate", "config", str(old), "--file", str(target), "--cluster", "box"]
    )
    assert result.exit_code == 3, shown(result)
    assert words in shown(result)
    assert not target.exists()


def test_an_old_config_that_is_not_json(tmp_path: Path) -> None:
    old = tmp_path / "config.json"
    old.write_text("defaultSku: X\n")
    result = cli_runner().invoke(main, ["migrate", "config", str(old), "--cluster", "box"])
    assert result.exit_code == 3 and "is not JSON" in shown(result)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(Exception) as caught:
        old_config_from({"foo": 1, "bar": 2, "partition": [{"name": ""}]}, "old.json")
    text = str(caught.value)
    assert "'foo'" in text and "'bar'" in text and "partition[0].name" in text


def test_names_with_glob_characters_are_flagged() -> None:
    migrated = to_yaml(old_config_from(old_config({"gpu*": "G"}, {"a": "b"}), "x"), cluster="box")
    assert any("'gpu*' was an exact name" in line for line in migrated.not_carried)


# ------------------------------------------------------------------------------ reconcile


RECONCILE_CONFIG = config_from_text(
    CONFIG.format(state="/tmp/unused.db", clusters="").replace("lag: 1m", "lag: 0s"), "r"
)


def _record(row: dict[str, str]) -> JobRecord:
    given = pipeline.Input(live_capture([row]), "row", None)
    (record,) = pipeline.parse_input(RECONCILE_CONFIG, given, None).records
    return record


def _old_event(
    row: dict[str, str], a: int, b: int, event_id: str, cluster: str = "box"
) -> dict[str, Any]:
    start = int(row["Start"])
    return {
        "id": event_id,
        "quantity": 4 * (b - a) / 3600,
        "startedAt": datetime.fromtimestamp(start + a, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endedAt": datetime.fromtimestamp(start + b, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "createdAt": "2026-01-01T00:00:00Z",
        "metadata": {
            "jobId": int(row["JobIDRaw"]),
            "user": "alice",
            "partition": "compute",
            "cluster": cluster,
            "account": "physics",
            "qos": "normal",
        },
    }


def _our_event(record: JobRecord, a: int, b: int, event_id: str) -> ledger.BilledEvent:
    key = f"st1:box:{record.job_id_raw}:{int(record.submit_at.timestamp())}:{a}-{b}:CPU_HOUR"
    parts = ledger.parse_event_key(key)
    assert parts is not None and record.start_at is not None
    return ledger.BilledEvent(
        cost_id=event_id,
        allocation="physics",
        key=key,
        parts=parts,
        quantity=(Decimal(4 * (b - a)) / 3600).quantize(Decimal("0.000001")),
        started_at=record.start_at + timedelta(seconds=a),
        ended_at=record.start_at + timedelta(seconds=b),
        created_at=NOW,
        agent="host/abc",
    )


def _judge(
    records: Sequence[JobRecord], ours: Sequence[ledger.BilledEvent], old: Sequence[dict[str, Any]]
) -> reconciling.Report:
    legacy = [ledger.legacy_event(item, "physics", ["box"]) for item in old]
    return reconciling.reconcile(
        records,
        ours,
        RECONCILE_CONFIG,
        agent="host/abc",
        now_at=NOW,
        window=pipeline.Window(ago(10 * H), NOW),
        floor_at=ago(int(3.5 * H)),  # 1.5 h into job 102: inside what the old agent billed
        legacy=[e for e in legacy if e is not None],
    )


def test_reconcile_counts_the_old_agents_events_across_the_cutover() -> None:
    done = sacct_row("102", ago(5 * H), 3 * H)  # billed 0-2h by the old agent, the rest by us
    record = _record(done)
    old = [_old_event(done, 0, H, "o1"), _old_event(done, H, 2 * H, "o2")]
    ours = [_our_event(record, 2 * H, 3 * H, "n1")]
    found = _judge([record], ours, old)
    assert found.findings == () and found.old_agent == 2
    (total,) = found.totals
    assert total.billed == total.expected  # the old events count within the floor's window
    assert reconciling.as_json(found)["oldAgentEvents"] == 2
    # the same without recognising them: the stretch the floor leaves in view is "missing"
    blind = _judge([record], ours, [])
    assert [f.kind for f in blind.findings] == ["missing"]
    assert reconciling.plan_repair(blind, {}).posts  # and a repair would bill it twice


def test_reconcile_reports_billing_over_the_old_agents_as_an_overlap() -> None:
    done = sacct_row("102", ago(5 * H), 3 * H)
    record = _record(done)
    old = [_old_event(done, 0, 2 * H, "o1")]
    ours = [_our_event(record, int(1.5 * H), 3 * H, "n1")]
    found = _judge([record], ours, old)
    (overlap,) = found.findings
    assert (overlap.kind, overlap.from_s, overlap.to_s) == ("overlap", int(1.5 * H), 2 * H)
    repair = reconciling.plan_repair(found, {})
    assert [d.event.cost_id for d in repair.deletions] == ["n1"]
    assert [p.event_key.split(":")[4] for p in repair.posts] == [f"{2 * H}-{3 * H}"]


def test_reconcile_tells_a_requeued_jobs_runs_apart() -> None:
    """The first run ends, the second starts a second later: each old event goes to the run
    its whole stretch lies in, however close they are."""
    begin = ago(int(3.6 * H))  # the floor (3.5 h ago) is 360 s into the first run
    first = sacct_row("103", begin, 600, state="REQUEUED", submit=begin - timedelta(minutes=1))
    second = sacct_row(
        "103", begin + timedelta(seconds=601), 900, submit=begin + timedelta(seconds=600)
    )
    records = [_record(first), _record(second)]
    old = [_old_event(first, 0, 600, "o1"), _old_event(second, 0, 900, "o2")]
    found = _judge(records, [], old)
    assert found.old_agent == 2 and found.findings == ()
    assert [f.kind for f in _judge(records, [], old[:1]).findings] == ["missing"]


@pytest.mark.parametrize(
    "meta, recognised",
    [
        ({"jobId": 102, "cluster": "box"}, True),
        ({"jobId": "102", "cluster": "box"}, True),
        ({"jobId": 102, "cluster": "other"}, False),
        ({"jobId": True, "cluster": "box"}, False),
        ({"jobId": "102_3", "cluster": "box"}, False),
        ({"jobId": 102, "cluster": "box", "eventKey": "st1:box:102:1:0-1:CPU_HOUR"}, False),
        ({"jobId": 102, "cluster": "box", "agent": "h/1"}, False),
    ],
)
def test_which_events_are_the_old_agents(meta: dict[str, Any], recognised: bool) -> None:
    item = {
        "id": "x",
        "quantity": 1,
        "startedAt": "2026-01-01T00:00:00Z",
        "endedAt": "2026-01-01T01:00:00Z",
        "metadata": meta,
    }
    assert (ledger.legacy_event(item, "physics", ["box"]) is not None) == recognised


def test_the_old_agents_events_are_read_from_the_api() -> None:
    with Emulator() as emulator:
        client = api.AllocationsClient(emulator.base_url, "test-org", DEFAULT_API_KEY)
        for cluster in ("box", "elsewhere"):
            client.post_usage(
                "physics",
                event_body(
                    job_id=102,
                    sku="CPU_HOUR",
                    cpus=4,
                    start_at=ago(5 * H),
                    from_s=0,
                    to_s=H,
                    user="alice",
                    partition="compute",
                    cluster=cluster,
                    account="physics",
                ),
            )
        ours = event_body(
            job_id=102,
            sku="CPU_HOUR",
            cpus=4,
            start_at=ago(5 * H),
            from_s=H,
            to_s=2 * H,
            user="alice",
            partition="compute",
            cluster="box",
            account="physics",
        )
        ours["metadata"]["eventKey"] = "st1:box:102:1:3600-7200:CPU_HOUR"
        client.post_usage("physics", ours)
        found = ledger.legacy_events(client, ["physics", "chemistry"], ["box"])
    (event,) = found
    assert (event.cluster, event.job_id_raw, event.allocation) == ("box", "102", "physics")
    assert event.quantity == 4 and event.ended_at == ago(4 * H)
