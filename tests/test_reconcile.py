"""reconcile: the pure comparison on hand-built records and events, the repair's convergence
(hypothesis), and the command end to end against the API emulator with a saved capture."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_tracker import api, delivery, events, ledger, pipeline, reconcile
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import JobRecord, PlannedEvent
from slurm_tracker.segments import split
from slurm_tracker.state import State
from tests.conftest import cli_runner, shown
from tests.emulator import DEFAULT_API_KEY, Emulator
from tests.factories import T0, live_capture, record, write_fake_sacct

UTC = timezone.utc
CONFIG = config_from_text(
    """
cluster: box
reporting_interval: 15m
sacct: {lag: 2m}
accounts: {map: {physics: phys, chemistry: chem}, ignore: [root]}
partitions:
  map:
    compute: CPU_HOUR
    gpu: [{sku: GPU_HOUR, metric: gpu}, {sku: CPU_HOUR, metric: cpu}]
""",
    "test",
)
AGENT = "login1/0123456789"
NOW = T0 + timedelta(days=2)
WINDOW = pipeline.Window(T0 - timedelta(hours=1), T0 + timedelta(days=1))
Q = Decimal("0.000001")


def key(rec: JobRecord, a: int, b: int, sku: str = "CPU_HOUR", cluster: str = "box") -> str:
    return f"st1:{cluster}:{rec.job_id_raw}:{int(rec.submit_at.timestamp())}:{a}-{b}:{sku}"


def billed(
    rec: JobRecord,
    a: int,
    b: int,
    *,
    sku: str = "CPU_HOUR",
    minute: int = 0,
    allocation: str = "phys",
    agent: str = AGENT,
    cost_id: str = "",
    cluster: str = "box",
) -> ledger.BilledEvent:
    """An event of ``rec`` billing elapsed seconds [a, b), created ``minute`` min after T0+1d."""
    text = key(rec, a, b, sku, cluster)
    parts = ledger.parse_event_key(text)
    assert parts is not None
    count = rec.tres.gpu if sku == "GPU_HOUR" else rec.tres.cpu
    assert rec.start_at is not None
    return ledger.BilledEvent(
        cost_id=cost_id or f"{rec.job_id}:{a}-{b}:{sku}:{minute}",
        allocation=allocation,
        key=text,
        parts=parts,
        quantity=(Decimal(count * (b - a)) / 3600).quantize(Q),
        started_at=rec.start_at + timedelta(seconds=a),
        ended_at=rec.start_at + timedelta(seconds=b),
        created_at=T0 + timedelta(days=1, minutes=minute),
        agent=agent,
    )


def judge(
    records: Sequence[JobRecord], found: Sequence[ledger.BilledEvent], **kwargs: Any
) -> reconcile.Report:
    options: dict[str, Any] = {"agent": AGENT, "now_at": NOW, "window": WINDOW, **kwargs}
    return reconcile.reconcile(records, found, CONFIG, **options)


def kinds(report: reconcile.Report) -> list[tuple[str, str, int, int]]:
    return [(f.kind, f.job_id, f.from_s, f.to_s) for f in report.findings]


def simulate(
    found: Sequence[ledger.BilledEvent], repair: reconcile.Repair
) -> list[ledger.BilledEvent]:
    """What the API holds once ``repair`` is done: deletions gone, posts added (created last)."""
    gone = {d.event.cost_id for d in repair.deletions}
    kept = [e for e in found if e.cost_id not in gone]
    return kept + [as_billed(p, n) for n, p in enumerate(repair.posts)]


def as_billed(post: PlannedEvent, n: int) -> ledger.BilledEvent:
    parts = ledger.parse_event_key(post.event_key)
    assert parts is not None
    return ledger.BilledEvent(
        cost_id=f"posted-{n}",
        allocation=post.allocation,
        key=post.event_key,
        parts=parts,
        quantity=post.quantity,
        started_at=post.started_at,
        ended_at=post.ended_at,
        created_at=NOW + timedelta(seconds=n),
        agent=str(post.metadata.get("agent", "")),
    )


JOB = record(job_id="11", elapsed_s=3600, cpu=4)  # physics/compute: 4 core-hours


# ---------------------------------------------------------------------- the pure comparison
def test_an_exact_tiling_is_no_discrepancy_and_totals_match() -> None:
    gpu = record(job_id="12", account="chemistry", partition="gpu", gpu=2, cpu=8, elapsed_s=1800)
    found = [
        billed(JOB, 0, 900),
        billed(JOB, 900, 3600),
        billed(gpu, 0, 1800, sku="GPU_HOUR", allocation="chem"),
        billed(gpu, 0, 1800, allocation="chem"),
    ]
    result = judge([JOB, gpu], found)
    assert result.findings == () and result.discrepancies == 0 and result.runs == 2
    assert [(t.allocation, t.sku, t.expected, t.billed, t.events) for t in result.totals] == [
        ("chem", "CPU_HOUR", Decimal(4), Decimal(4), 1),
        ("chem", "GPU_HOUR", Decimal(1), Decimal(1), 1),
        ("phys", "CPU_HOUR", Decimal(4), Decimal(4), 2),
    ]
    assert reconcile.plan_repair(result, {}).deletions == ()
    assert reconcile.plan_repair(result, {}).posts == ()


def test_missing_stretches_of_a_final_run_go_up_to_elapsed_raw() -> None:
    result = judge([JOB], [billed(JOB, 900, 1800)])
    assert kinds(result) == [("missing", "11", 0, 900), ("missing", "11", 1800, 3600)]
    assert [f.quantity for f in result.findings] == [Decimal(1), Decimal(2)]
    assert result.findings[1].keys == (key(JOB, 1800, 3600),)
    repair = reconcile.plan_repair(result, {})
    assert [p.event_key for p in repair.posts] == [key(JOB, 0, 900), key(JOB, 1800, 3600)]
    post = repair.posts[1]
    assert post.allocation == "phys" and post.quantity == Decimal(2)
    assert post.metadata["eventKey"] == post.event_key and post.metadata["agent"] == AGENT
    assert post.metadata["elapsedFrom"] == 1800 and post.metadata["jobId"] == "11"
    assert post.to_s == 3600 and post.final  # the state's progress: the run is billed whole


def test_a_one_second_gap_is_missing() -> None:
    result = judge([JOB], [billed(JOB, 0, 1799), billed(JOB, 1800, 3600)])
    assert kinds(result) == [("missing", "11", 1799, 1800)]
    assert result.findings[0].quantity == Decimal("0.001111")


def test_an_event_without_created_at_is_kept_last() -> None:
    undated = replace(billed(JOB, 0, 3600, minute=0), created_at=None)
    steps = [billed(JOB, 0, 1800, minute=5), billed(JOB, 1800, 3600, minute=6)]
    repair = reconcile.plan_repair(judge([JOB], [undated, *steps]), {})
    assert [d.event.cost_id for d in repair.deletions] == [undated.cost_id]


def test_a_run_with_no_event_at_all_is_missing_whole() -> None:
    result = judge([JOB], [])
    assert kinds(result) == [("missing", "11", 0, 3600)]
    assert result.totals[0].expected == Decimal(4) and result.totals[0].billed == 0


def test_a_running_run_is_judged_only_below_what_is_billed() -> None:
    running = record(job_id="21", elapsed_s=4000, final=False, cpu=2)
    found = [billed(running, 0, 900), billed(running, 1800, 2700)]
    result = judge([running], found, now_at=T0 + timedelta(seconds=4100))
    assert kinds(result) == [("missing", "21", 900, 1800)]  # not 2700-4000: the next sync's
    (post,) = reconcile.plan_repair(result, {}).posts
    assert post.to_s == 2700 and not post.final


def test_a_running_run_not_billed_yet_is_no_discrepancy() -> None:
    running = record(job_id="21", elapsed_s=600, final=False)
    assert judge([running], [], now_at=T0 + timedelta(seconds=700)).findings == ()


def test_a_sku_billed_less_far_than_another_of_a_running_run_is_missing_up_to_it() -> None:
    running = record(job_id="22", partition="gpu", gpu=1, cpu=2, elapsed_s=4000, final=False)
    found = [
        billed(running, 0, 1800, sku="GPU_HOUR"),
        billed(running, 0, 900),
    ]
    result = judge([running], found, now_at=T0 + timedelta(seconds=4100))
    assert [(f.kind, f.sku, f.from_s, f.to_s) for f in result.findings] == [
        ("missing", "CPU_HOUR", 900, 1800)
    ]


def test_one_key_accepted_twice_is_a_duplicate_and_the_later_copy_is_deleted() -> None:
    first = billed(JOB, 0, 3600, minute=1)
    again = billed(JOB, 0, 3600, minute=5)
    result = judge([JOB], [again, first])
    assert kinds(result) == [("duplicate", "11", 0, 3600)]
    assert result.findings[0].quantity == Decimal(4) and result.discrepancies == 1
    repair = reconcile.plan_repair(result, {})
    assert [d.event.cost_id for d in repair.deletions] == [again.cost_id]
    assert repair.posts == () and repair.dropped_keys == frozenset()  # the key stays billed


def test_one_event_listed_twice_by_paging_is_not_a_duplicate() -> None:
    event = billed(JOB, 0, 3600)
    result = judge([JOB], [event, replace(event)])  # the same id, read on two pages
    assert result.findings == () and result.events == 1


@pytest.mark.parametrize(
    ("order", "deleted", "posted"),
    [
        # the steps were billed first (the old state), then the whole run again (a new one)
        ("steps first", ["0-3600"], ["1800-3600"]),
        ("whole first", ["0-900", "900-1800"], []),
    ],
)
def test_a_lost_state_file_gives_overlaps_repaired_by_the_earliest_events(
    order: str, deleted: list[str], posted: list[str]
) -> None:
    whole_at, steps_at = (9, 1) if order == "steps first" else (1, 9)
    found = [
        billed(JOB, 0, 900, minute=steps_at),
        billed(JOB, 900, 1800, minute=steps_at + 1),
        billed(JOB, 0, 3600, minute=whole_at),
    ]
    result = judge([JOB], found)
    overlaps = [f for f in result.findings if f.kind == "overlap"]
    assert len(overlaps) == 2 and {f.kind for f in result.findings} == {"overlap"}
    assert {(f.from_s, f.to_s) for f in overlaps} == {(0, 900), (900, 1800)}
    assert all(key(JOB, 0, 3600) in f.keys for f in overlaps)
    repair = reconcile.plan_repair(result, {})
    assert [d.event.key.split(":")[4] for d in repair.deletions] == deleted
    assert [p.event_key.split(":")[4] for p in repair.posts] == posted
    assert repair.dropped_keys == {d.event.key for d in repair.deletions}
    assert judge([JOB], simulate(found, repair)).findings == ()


def test_billing_beyond_elapsed_raw_is_over_billing_and_not_repaired() -> None:
    shrunk = replace(JOB, elapsed_s=1800, end_at=T0 + timedelta(seconds=1800))
    result = judge([shrunk], [billed(shrunk, 0, 3600)])
    (finding,) = result.findings
    assert (finding.kind, finding.from_s, finding.to_s) == ("over-billed", 1800, 3600)
    assert finding.quantity == Decimal(2)
    repair = reconcile.plan_repair(result, {})
    assert repair.deletions == () and repair.posts == ()


def test_events_of_runs_sacct_did_not_return_are_judged_inside_the_window_only() -> None:
    ghost = record(job_id="31")  # not in sacct's answer
    edge = record(job_id="32", start_at=WINDOW.start_at - timedelta(minutes=30))
    found = [billed(ghost, 0, 3600), billed(edge, 0, 3600), billed(edge, 0, 3600, minute=3)]
    result = judge([], found)
    assert [(f.kind, f.job_id) for f in result.findings] == [
        ("unknown-run", "31"),
        ("duplicate", "32"),
    ]
    repair = reconcile.plan_repair(result, {})
    # a run sacct did not return: only extra copies of one key are deleted, nothing posted
    assert [d.event.cost_id for d in repair.deletions] == [found[2].cost_id]
    assert repair.posts == ()


def test_overlaps_of_a_run_that_cannot_be_posted_again_are_not_deleted() -> None:
    ghost = record(job_id="31")
    found = [billed(ghost, 0, 900), billed(ghost, 0, 3600, minute=2)]
    repair = reconcile.plan_repair(judge([], found), {})
    assert repair.deletions == () and repair.posts == ()


def test_events_of_other_agents_are_listed_but_are_no_discrepancy() -> None:
    found = [billed(JOB, 0, 1800, agent="login2/fedcba9876"), billed(JOB, 1800, 3600, agent="")]
    result = judge([JOB], found)
    assert [(f.kind, f.from_s) for f in result.findings] == [("other-agent", 0)]
    assert "login2/fedcba9876" in result.findings[0].detail
    assert result.discrepancies == 0


@pytest.mark.parametrize(
    ("rec", "event_allocation", "sku", "why"),
    [
        (JOB, "chem", "CPU_HOUR", "the mapping gives phys"),
        (JOB, "phys", "GPU_HOUR", "SKU GPU_HOUR is not billed"),
        (record(job_id="11", account="root"), "phys", "CPU_HOUR", "ignored by the config"),
        (record(job_id="11", account="nobody"), "phys", "CPU_HOUR", "maps to no allocation"),
    ],
)
def test_an_event_the_current_mapping_does_not_give_the_run_is_misrouted(
    rec: JobRecord, event_allocation: str, sku: str, why: str
) -> None:
    found = [billed(rec, 0, 3600, allocation=event_allocation, sku=sku)]
    result = judge([rec], found)
    misrouted = [f for f in result.findings if f.kind == "misrouted"]
    assert len(misrouted) == 1 and why in misrouted[0].detail
    assert reconcile.plan_repair(result, {}).deletions == ()


def test_a_misrouted_event_still_covers_its_seconds() -> None:
    """Moving usage between allocations is a correction: never billed a second time here."""
    result = judge([JOB], [billed(JOB, 0, 3600, allocation="chem")])
    assert kinds(result) == [("misrouted", "11", 0, 3600)]
    assert reconcile.plan_repair(result, {}).posts == ()


def test_events_of_other_clusters_are_ignored() -> None:
    result = judge([JOB], [billed(JOB, 0, 3600), billed(JOB, 0, 3600, cluster="other")])
    assert result.findings == () and result.events == 1


def test_usage_before_the_billing_floor_is_not_expected() -> None:
    floor = T0 + timedelta(seconds=1800)  # JOB started at T0
    assert judge([JOB], [billed(JOB, 1800, 3600)], floor_at=floor).findings == ()
    assert kinds(judge([JOB], [], floor_at=floor)) == [("missing", "11", 1800, 3600)]
    ended = T0 + timedelta(seconds=3601)
    assert judge([JOB], [], floor_at=ended).findings == ()


def test_records_the_billing_path_would_not_bill_yet_are_not_judged() -> None:
    incomplete = record(job_id="41", partition="")
    absurd = record(job_id="42", start_at=NOW + timedelta(days=30))
    found = [billed(incomplete, 0, 3600), billed(absurd, 0, 3600)]
    result = judge([incomplete, absurd], found)
    assert result.findings == () and result.runs == 0
    assert [j for j, _ in result.not_judged] == ["41", "42"]
    again = judge([incomplete], [*found, billed(incomplete, 0, 3600, minute=3)])
    assert kinds(again) == [("duplicate", "41", 0, 3600)]  # provable whatever the record
    assert len(reconcile.plan_repair(again, {}).deletions) == 1


def test_missing_usage_across_a_month_start_is_posted_in_two_events() -> None:
    start = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
    late = record(job_id="51", start_at=start, elapsed_s=7200)
    window = pipeline.Window(start, start + timedelta(hours=3))
    result = judge([late], [], window=window, now_at=datetime(2026, 4, 2, tzinfo=UTC))
    assert kinds(result) == [("missing", "51", 0, 7200)] and result.findings[0].quantity == 8
    posts = reconcile.plan_repair(result, {}).posts
    assert [(p.event_key.split(":")[4], p.quantity) for p in posts] == [
        ("0-3600", Decimal(4)),
        ("3600-7200", Decimal(4)),
    ]


def test_runs_with_events_not_settled_in_the_outbox_are_not_repaired() -> None:
    other = record(job_id="12")
    result = judge([JOB, other], [billed(JOB, 0, 900)])
    outbox = {key(JOB, 900, 3600): "pending"}
    repair = reconcile.plan_repair(result, outbox)
    assert [p.event_key for p in repair.posts] == [key(other, 0, 3600)]
    assert len(repair.skipped) == 1 and "box:11:" in repair.skipped[0]
    assert "pending in the outbox" in repair.skipped[0]


def test_a_run_whose_new_key_is_already_in_the_outbox_is_not_repaired() -> None:
    result = judge([JOB], [billed(JOB, 0, 900)])
    repair = reconcile.plan_repair(result, {key(JOB, 900, 3600): "acked"})
    assert repair.posts == () and "already in the outbox (acked)" in repair.skipped[0]
    assert reconcile.plan_repair(result, {key(JOB, 900, 3600): "dropped"}).posts == ()


# ------------------------------------------------------------------- the repair converges
STRETCH = st.tuples(st.integers(0, 12), st.integers(1, 12)).map(
    lambda t: (t[0] * 600, min(7200, t[0] * 600 + t[1] * 600))
)


@settings(max_examples=200, deadline=None)
@given(
    stretches=st.lists(st.tuples(STRETCH, st.integers(0, 50)), max_size=8),
    final=st.booleans(),
)
def test_after_the_repair_every_run_and_sku_is_tiled_exactly_once(
    stretches: list[tuple[tuple[int, int], int]], final: bool
) -> None:
    rec = record(job_id="61", elapsed_s=7200, final=final, cpu=3)
    found = [
        billed(rec, a, b, minute=m, cost_id=f"id-{n}")
        for n, ((a, b), m) in enumerate(stretches)
        if a < b
    ]
    now_at = T0 + timedelta(seconds=7300)
    result = judge([rec], found, now_at=now_at)
    repaired = simulate(found, reconcile.plan_repair(result, {}))
    again = judge([rec], repaired, now_at=now_at)
    assert again.discrepancies == 0, kinds(again)
    assert reconcile.plan_repair(again, {}).deletions == ()
    covered = sorted((e.parts.from_s, e.parts.to_s) for e in repaired)
    assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:]))  # no overlap
    top = 7200 if final else max((e.parts.to_s for e in found), default=0)
    assert sum(b - a for a, b in covered) == top
    # every second still billed was billed before: no kept event was deleted for nothing
    kept_ids = {e.cost_id for e in repaired}
    for event in found:
        if event.cost_id not in kept_ids:
            assert any(
                e.cost_id in kept_ids and ledger.parse_event_key(e.key) and _meet(e, event)
                for e in found
            )


def _meet(a: ledger.BilledEvent, b: ledger.BilledEvent) -> bool:
    return max(a.parts.from_s, b.parts.from_s) < min(a.parts.to_s, b.parts.to_s)


# ---------------------------------------------------------------------- end to end
NOW_S = int(time.time()) // 60 * 60
T = NOW_S - 6 * 3600  # runs of the last hours of the real clock (plausibility is checked)
OTHER_AGENT = "login2/fedcba9876"
EMULATOR_CONFIG = """
cluster: box
state_file: state.db
reporting_interval: 10m
api: {{organization: test-org, url: "{url}", max_attempts: 2, max_retry_time: 5s}}
sacct: {{backfill_pause: 0s}}
accounts: {{map: {{physics: physics, chemistry: chemistry}}}}
partitions:
  map:
    compute: CPU_HOUR
    gpu: [{{sku: GPU_HOUR, metric: gpu}}, {{sku: CPU_HOUR, metric: cpu}}]
"""


def row(job: str, elapsed: int, *, account: str = "physics", **fields: str) -> dict[str, str]:
    start = T + int(job) * 60
    return {
        "JobID": job,
        "Account": account,
        "Partition": "compute",
        "Submit": str(start),
        "Start": str(start),
        "End": str(start + elapsed),
        "ElapsedRaw": str(elapsed),
        "State": "COMPLETED",
        "AllocTRES": "cpu=4,mem=4G,node=1,billing=4",
        **fields,
    }


GPU_ROW = {"Partition": "gpu", "AllocTRES": "cpu=8,gres/gpu:a100=2,gres/gpu=2,mem=16G,node=1"}
ROWS = [
    row("11", 3600),  # billed once, then a second copy of the same key
    row("12", 7200),  # only the first half hour billed
    row("13", 3600, account="chemistry", **GPU_ROW),  # billed in steps, then whole again
    row("14", 1800),  # billed by another agent, exactly
    row("15", 600),  # billed exactly by this agent; ended before --start: not judged
]
ALL_ROWS = {r["JobID"]: r for r in [*ROWS, row("99", 600)]}  # 99: slurmdbd does not know it


class Site:
    """A config, a state file and a saved capture around an in-process emulator."""

    def __init__(self, directory: Path, emulator: Emulator) -> None:
        self.dir = directory
        self.emulator = emulator
        self.config_path = directory / "config.yaml"
        self.config_path.write_text(EMULATOR_CONFIG.format(url=emulator.base_url))
        self.capture = directory / "capture.txt"
        self.capture.write_bytes(live_capture(ROWS))
        self.config = config_from_text(EMULATOR_CONFIG.format(url=emulator.base_url), "site")
        self.client = api.AllocationsClient(emulator.base_url, "test-org", DEFAULT_API_KEY)
        self.agent = ledger.agent_id(directory / "state.db")

    def run(self, *args: str) -> Result:
        return cli_runner().invoke(
            main,
            [
                "reconcile",
                "--config",
                str(self.config_path),
                "--sacct-file",
                str(self.capture),
                "--start",  # after jobs 11 to 15 started; job 15 ended before it
                events.rfc3339(datetime.fromtimestamp(T + 1800, UTC)),
                "--end",
                events.rfc3339(datetime.fromtimestamp(NOW_S - 60, UTC)),
                *args,
            ],
            env={"PW_API_KEY": DEFAULT_API_KEY},
        )

    def planned(self, job: str, a: int, b: int, *, agent: str = "") -> list[PlannedEvent]:
        """The events a sync plans for elapsed seconds [a, b) of ``job`` (every SKU)."""
        rec = self.record(ALL_ROWS[job])
        target = map_record(rec, self.config.accounts, self.config.partitions)
        assert isinstance(target, Target)
        segments = split(rec, a, b)
        return events.plan(segments, target.allocation, target.charges, (), agent or self.agent)

    def record(self, fields: dict[str, str]) -> JobRecord:
        given = pipeline.Input(live_capture([fields]), "row", None)
        (rec,) = pipeline.parse_input(self.config, given, None).records
        return rec

    def post(self, minute: int, planned: Sequence[PlannedEvent]) -> None:
        """POST straight to the API (a lost state file, another agent), created at T+minute."""
        self.emulator.set_now(datetime.fromtimestamp(T + 7200 + minute * 60, UTC))
        for event in planned:
            self.client.post_usage(event.allocation, events.request_body(event))

    def post_raw(self, allocation: str, metadata: dict[str, Any]) -> None:
        body = {
            "sku": "CPU_HOUR",
            "quantity": 1.0,
            "startedAt": events.rfc3339(datetime.fromtimestamp(T + 600, UTC)),
            "endedAt": events.rfc3339(datetime.fromtimestamp(T + 1500, UTC)),
            "metadata": metadata,
        }
        self.client.post_usage(allocation, body)

    def bill_through_state(self, minute: int, planned: Sequence[PlannedEvent]) -> None:
        """Bill as a sync does: committed to the state's outbox, then delivered."""
        self.emulator.set_now(datetime.fromtimestamp(T + 7200 + minute * 60, UTC))
        with State.open(self.dir / "state.db") as store:
            plan = pipeline.Plan(events=tuple(planned), skipped=(), rejected=())
            pipeline.commit(store, plan, datetime.fromtimestamp(T + 7200, UTC), None)
            delivered = delivery.deliver_outbox(store, self.client, pipeline.utc_now)
        assert delivered.acked == len(planned)

    def ours(self) -> list[Any]:
        """The emulator's events of cluster box carrying our key format."""
        return [
            e
            for e in self.emulator.events()
            if (p := ledger.parse_event_key(e.event_key or "")) and p.cluster == "box"
        ]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Emulator(max_page_size=3) as emulator:  # every read goes past one page
        yield Site(tmp_path, emulator)


def preload(site: Site) -> dict[str, Any]:
    """Missing, duplicate, overlapping and foreign events; returns the foreign ones by name."""
    site.post(0, site.planned("11", 0, 3600))
    site.post(1, site.planned("12", 0, 1800))
    site.post(2, site.planned("13", 0, 900) + site.planned("13", 900, 1800))  # the lost state
    site.post(3, site.planned("14", 0, 1800, agent=OTHER_AGENT))
    site.bill_through_state(4, site.planned("15", 0, 600))
    # the current state file bills job 13 whole again, and job 11 a second time
    site.bill_through_state(5, site.planned("13", 0, 3600))
    site.post(6, site.planned("11", 0, 3600))
    site.emulator.set_now(datetime.fromtimestamp(T + 7200 + 7 * 60, UTC))
    other_cluster = f"st1:other:11:{T + 660}:0-3600:CPU_HOUR"
    site.post_raw("physics", {"eventKey": other_cluster})
    site.post_raw("physics", {"eventKey": f"st1:box:garbage-{T}", "note": "st1:box:"})
    site.post_raw("physics", {"note": "manual credit for st1:box:11"})
    site.emulator.set_now(None)
    foreign = [e for e in site.emulator.events() if e not in site.ours()]
    assert len(foreign) == 3
    return {"foreign": {e.id for e in foreign}}


def assert_exact(site: Site) -> None:
    """Each run and SKU tiled exactly once over [0, ElapsedRaw), with correct quantities."""
    expected = {
        ("11", "CPU_HOUR"): (3600, 4),
        ("12", "CPU_HOUR"): (7200, 4),
        ("13", "CPU_HOUR"): (3600, 8),
        ("13", "GPU_HOUR"): (3600, 2),
        ("14", "CPU_HOUR"): (1800, 4),
        ("15", "CPU_HOUR"): (600, 4),
    }
    stretches: dict[tuple[str, str], list[tuple[int, int, Decimal]]] = {}
    for event in site.ours():
        parts = ledger.parse_event_key(event.event_key)
        assert parts is not None
        stretches.setdefault((parts.job_id_raw, parts.sku), []).append(
            (parts.from_s, parts.to_s, event.quantity)
        )
    assert set(stretches) == set(expected)
    for where, (elapsed, count) in expected.items():
        pieces = sorted(stretches[where])
        assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]], (where, pieces)
        assert pieces[-1][1] == elapsed, (where, pieces)
        for a, b, quantity in pieces:
            exact = (Decimal(count * (b - a)) / 3600).quantize(Q, rounding=ROUND_HALF_EVEN)
            assert quantity == exact, (where, a, b)
    assert not [k for k, n in Counter(e.event_key for e in site.ours()).items() if n > 1]


def ended_at(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def test_reconcile_reports_each_kind_and_the_repair_leaves_the_api_exact(site: Site) -> None:
    names = preload(site)
    before = site.emulator.events()

    found = site.run("--output", "json")
    assert found.exit_code == 6, shown(found)
    lists = [r["query"] for r in site.emulator.requests() if r["method"] == "GET"]
    # ours by their key, and the older Go agent's by its metadata (whatever the state says)
    assert {q["metadata"] for q in lists} == {"st1:box:", "jobId"}
    # events are read from the earliest start of the runs judged (job 11), not from --start
    assert {ended_at(q["endedAtFrom"]) for q in lists} == {T + 660}
    assert max(int(q["page"]) for q in lists) >= 3  # read past one page (3 items a page)
    doc = as_json(found)
    assert doc["agent"] == site.agent and doc["runs"] == 4  # job 15 ended before --start
    findings = [
        (f["kind"], f["jobId"], f["sku"], f["elapsedFrom"], f["elapsedTo"]) for f in doc["findings"]
    ]
    assert sorted(findings) == sorted(
        [
            ("missing", "12", "CPU_HOUR", 1800, 7200),
            ("duplicate", "11", "CPU_HOUR", 0, 3600),
            ("overlap", "13", "CPU_HOUR", 0, 900),
            ("overlap", "13", "CPU_HOUR", 900, 1800),
            ("overlap", "13", "GPU_HOUR", 0, 900),
            ("overlap", "13", "GPU_HOUR", 900, 1800),
            ("other-agent", "14", "CPU_HOUR", 0, 1800),
        ]
    )
    assert doc["discrepancies"] == 6
    physics = {(t["allocation"], t["sku"]): t for t in doc["totals"]}[("physics", "CPU_HOUR")]
    assert physics["expected"] == pytest.approx(4 + 8 + 2)
    assert physics["billed"] == pytest.approx(4 + 4 + 2 + 2)

    dry = site.run("--repair")
    assert dry.exit_code == 6, shown(dry)
    assert "would delete" in dry.stdout and "would post" in dry.stdout
    assert site.emulator.events() == before  # a dry repair changes nothing

    done = site.run("--repair", "--yes", "--output", "json", "-v")
    assert done.exit_code == 0, shown(done)
    repair = as_json(done)["repair"]
    assert repair["done"] and repair["deleted"] == 3
    assert repair["posted"] == len(repair["post"]) >= 3  # more if a month starts inside
    posted = [(ledger.parse_event_key(p["metadata"]["eventKey"]), p) for p in repair["post"]]
    assert {(k.job_id_raw, k.sku) for k, _ in posted if k} == {
        ("12", "CPU_HOUR"),
        ("13", "CPU_HOUR"),
        ("13", "GPU_HOUR"),
    }
    assert sorted(d["eventKey"].split(":")[4] for d in repair["delete"]) == [
        "0-3600",
        "0-3600",
        "0-3600",
    ]
    assert "deleting event st1:box:13:" in done.stderr and "posting event" in done.stderr
    assert as_json(done)["after"]["discrepancies"] == 0
    assert_exact(site)
    survivors = {e.id for e in site.emulator.events()}
    assert names["foreign"] <= survivors  # never touched
    agents = {e.metadata.get("agent") for e in site.ours()}
    assert agents == {site.agent, OTHER_AGENT}
    with State.open(site.dir / "state.db", readonly=True) as store:
        rows = {r.event_key: r for r in store.outbox()}
    whole = [r for k, r in rows.items() if k.startswith("st1:box:13:") and ":0-3600:" in k]
    assert len(whole) == 2 and all(r.status == "dropped" for r in whole)
    assert all("reconcile --repair" in r.last_error for r in whole)
    reposted = [rows[p["metadata"]["eventKey"]] for p in repair["post"]]
    assert all(r.status == "acked" for r in reposted)

    again = site.run()
    assert again.exit_code == 0, shown(again)
    assert "0 discrepancies, 1 event of other agents" in again.stdout
    assert site.run("--repair", "--yes").exit_code == 0
    assert_exact(site)


def test_over_billed_unknown_and_misrouted_events_are_reported_never_touched(
    site: Site,
) -> None:
    site.post(0, site.planned("11", 0, 3600) + site.planned("12", 0, 7200))
    site.post(1, site.planned("13", 0, 3600) + site.planned("15", 0, 600))
    site.post(2, [replace(e, allocation="chemistry") for e in site.planned("14", 0, 1800)])
    site.post(3, site.planned("99", 0, 600) + site.planned("99", 0, 300))
    site.post(4, site.planned("99", 0, 600))  # a second copy of a key of the unknown run
    site.emulator.set_now(None)
    # slurmdbd now says job 11 ran 1800 s (an admin fixed a runaway job)
    site.capture.write_bytes(live_capture([row("11", 1800), *ROWS[1:]]))
    before = {e.id for e in site.emulator.events()}

    result = site.run("--repair", "--yes", "--output", "json")
    assert result.exit_code == 6, shown(result)
    doc = as_json(result)
    counts = {k: n for k, n in doc["counts"].items() if n}
    assert counts == {"over-billed": 1, "unknown-run": 3, "misrouted": 1, "duplicate": 1}
    over = next(f for f in doc["findings"] if f["kind"] == "over-billed")
    assert (over["jobId"], over["elapsedFrom"], over["elapsedTo"]) == ("11", 1800, 3600)
    assert over["quantity"] == 2
    # only the later copy of job 99's key goes: its overlap and the rest stay for an operator
    (deleted,) = doc["repair"]["delete"]
    assert ":99:" in deleted["eventKey"] and ":0-600:" in deleted["eventKey"]
    assert doc["repair"]["post"] == []
    assert before - {e.id for e in site.emulator.events()} == {deleted["id"]}
    after = {k: n for k, n in doc["after"]["counts"].items() if n}
    assert after == {"over-billed": 1, "unknown-run": 2, "misrouted": 1}


def test_yes_without_repair_and_an_empty_window_are_usage_errors(site: Site) -> None:
    assert site.run("--yes").exit_code == 2
    result = cli_runner().invoke(
        main,
        [
            "reconcile",
            "--config",
            str(site.config_path),
            "--start",
            "2026-03-02",
            "--end",
            "2026-03-01",
        ],
        env={"PW_API_KEY": DEFAULT_API_KEY},
    )
    assert result.exit_code == 2 and "--end must be after --start" in shown(result)


def test_a_run_with_events_waiting_in_the_outbox_is_left_alone(site: Site) -> None:
    site.post(0, site.planned("11", 0, 1800))
    with State.open(site.dir / "state.db") as store:  # committed, never delivered
        plan = pipeline.Plan(events=tuple(site.planned("11", 1800, 3600)), skipped=(), rejected=())
        pipeline.commit(store, plan, pipeline.utc_now(), None)
    dry = site.run()
    assert dry.exit_code == 6 and "not on the API yet" in dry.stderr
    # --yes delivers the outbox first: then nothing of job 11 is missing any more
    done = site.run("--repair", "--yes", "--output", "json")
    doc = as_json(done)
    assert not [f for f in doc["findings"] if f["jobId"] == "11"]
    assert [e.event_key for e in site.ours() if ":11:" in e.event_key].count(
        site.planned("11", 1800, 3600)[0].event_key
    ) == 1


def test_mark_deleted_drops_the_rows_of_deleted_events_once(tmp_path: Path) -> None:
    planned = events.plan(split(JOB, 0, 3600), "phys", CONFIG.partitions.exact["compute"])
    with State.open(tmp_path / "state.db") as store:
        plan = pipeline.Plan(events=tuple(planned), skipped=(), rejected=())
        pipeline.commit(store, plan, NOW, None)
        store.mark_acked(planned[0].event_key, "id-1", NOW)
        keys = [planned[0].event_key, "st1:box:nothing:1:0-1:CPU_HOUR"]
        assert store.mark_deleted(keys, "deleted by reconcile", NOW) == 1
        assert store.mark_deleted(keys, "deleted by reconcile", NOW) == 0
        (row,) = store.outbox()
    assert (row.status, row.last_error) == ("dropped", "deleted by reconcile")


def test_the_repair_refuses_to_delete_anything_not_of_our_key_format(site: Site) -> None:
    site.post(0, site.planned("11", 0, 3600))
    (stored,) = site.emulator.events()
    theirs = billed(site.record(ROWS[0]), 0, 3600, cluster="other", cost_id=stored.id)
    repair = reconcile.Repair((reconcile.Deletion(theirs, "test"),), (), frozenset(), ())
    with State.open(site.dir / "state.db") as store, pytest.raises(AssertionError):
        reconcile.apply_repair(repair, site.config, store, site.client, NOW)
    assert site.emulator.events() == [stored]


def test_slurmdbd_is_read_in_chunks_with_a_pause_and_one_record_per_run(tmp_path: Path) -> None:
    capture = tmp_path / "capture.txt"
    capture.write_bytes(live_capture([*ROWS, row("11", 1800)]))  # job 11 twice: the longer wins
    fake = write_fake_sacct(tmp_path / "fake-sacct", capture)
    config = config_from_text(
        EMULATOR_CONFIG.format(url="https://api.test").replace(
            "sacct: {backfill_pause: 0s}",
            f"sacct: {{path: {fake}, backfill_pause: 7s, backfill_chunk: 2h}}",
        ),
        "live",
    )
    pauses: list[float] = []
    window = pipeline.Window(
        datetime.fromtimestamp(T, UTC), datetime.fromtimestamp(T + 6 * 3600, UTC)
    )
    records, rejected = reconcile.read_records(
        config, window, sacct_file=None, stdin=io.BytesIO(), environ={}, sleep=pauses.append
    )
    assert pauses == [7, 7]  # three chunks of 2 h
    assert sorted(r.job_id for r in records) == ["11", "12", "13", "14", "15"]
    assert [r.elapsed_s for r in records if r.job_id == "11"] == [3600] and rejected == 0


def test_the_go_agents_events_count_when_the_state_file_forgot_the_cutover(site: Site) -> None:
    # `migrate state` recorded the cutover, then the state file was lost and made anew: it no
    # longer says the Go agent billed job 12's first half hour. Mutant: reading that agent's
    # events only when the state records a migration (that stretch "missing", then re-posted).
    rec = site.record(ALL_ROWS["12"])
    assert rec.start_at is not None
    site.client.post_usage(
        "physics",
        {
            "sku": "CPU_HOUR",
            "quantity": 2.0,
            "startedAt": events.rfc3339(rec.start_at),
            "endedAt": events.rfc3339(rec.start_at + timedelta(seconds=1800)),
            "metadata": {
                "jobId": 12,
                "user": "alice",
                "partition": "compute",
                "cluster": "box",
                "account": "physics",
                "qos": "normal",
            },
        },
    )
    site.post(1, site.planned("12", 1800, 7200))
    doc = as_json(site.run("--output", "json"))
    assert doc["oldAgentEvents"] == 1
    assert [f for f in doc["findings"] if f["jobId"] == "12"] == []
