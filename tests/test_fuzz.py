"""Fuzzing the whole read -> plan -> render path (issue 8): zero exceptions escape; every input
either plans, or rejects records, or (when it cannot be read at all) is an InputError.

Seeds are the project's own captures of the test cluster (tests/data) and, when ../shared is
there, the public fixtures; hypothesis mutates fields and bytes. Bounded to seconds. Inputs
that once crashed or were billed are kept in tests/data/regressions (see its README)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_tracker import pipeline, report
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.errors import InputError
from slurm_tracker.models import ParseResult
from slurm_tracker.parse import parse_live, parse_sacct
from slurm_tracker.sacct import live_fields, new_delimiter
from tests.conftest import SHARED, cli_runner

DATA = Path(__file__).parent / "data"
REGRESSIONS = sorted((DATA / "regressions").glob("*.txt"))
NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
CONFIG_TEXT = """
cluster: box
accounts: {map: {physics: phys, chemistry: chem}, default: other}
partitions:
  map:
    compute: [CPU_HOUR, {sku: MEM_GB_HOUR, metric: mem}, {sku: NODE_HOUR, metric: node}]
    gpu: [{sku: GPU_HOUR, metric: gpu}, {sku: BILLING_HOUR, metric: billing}]
  default: CPU_HOUR
"""
CONFIG = config_from_text(CONFIG_TEXT, "fuzz")
NASTY = [
    "253402300799",  # 9999-12-31T23:59:59
    "99999999999999999999",
    "9" * 5000,
    "-1",
    "0",
    "",
    "Unknown",
    "9999-12-31T23:59:59",
    "0001-01-01T00:00:00",
    "2026-13-45T99:99:99",
    "cpu=4294967293,node=1",
    "cpu=1,mem=" + "9" * 80 + "P",
    "cpu=1,mem=1e9999G",
    "gres/gpu=99999999999999999999",
    "billing=-5",
    "x" * 10_000,
    "\x00\x1b[2J",
    "nan",
    "1e308",
    "10-99:99:99",
]


def seeds() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(DATA.glob("sacct-box-*")) if p.suffix != ".tsv"]
    public = SHARED / "fixtures" / "sacct" / "public"
    if public.is_dir():
        found += [p.read_bytes() for p in sorted(public.iterdir()) if p.suffix in (".txt", ".json")]
    return found


SEEDS = seeds()


def run_whole_path(parsed: ParseResult) -> pipeline.Plan:
    """plan + both renderings: everything a dry run does after parsing."""
    plan = pipeline.plan_usage(parsed, {}, CONFIG, None, now_at=NOW)
    totals = pipeline.totals(plan.events)
    json.dumps(report.plan_json(plan, totals, None))
    report.plan_text(plan, totals, None, source="fuzz", verbose=True)
    return plan


def accounted(parsed: ParseResult, plan: pipeline.Plan) -> None:
    """Every record ends as events, a skip or a rejection: nothing disappears."""
    ended = {e.run for e in plan.events} | {s.run for s in plan.skipped}
    ended |= {r.run for r in plan.rejected}
    assert {r.run for r in parsed.records} <= ended


def mutate_text(data: bytes, rnd: random.Random, rounds: int) -> bytes:
    """Replace field values (between delimiters) with nasty ones, and flip some bytes."""
    out = bytearray(data)
    for _ in range(rounds):
        action = rnd.random()
        if action < 0.6 and b"|" in out:
            bars = [i for i, b in enumerate(out) if b == ord("|")]
            start = rnd.choice(bars) + 1
            end = out.find(b"|", start)
            end = end if end >= 0 else len(out)
            out[start:end] = rnd.choice(NASTY).encode()
        elif action < 0.8 and out:
            out[rnd.randrange(len(out))] = rnd.randrange(256)
        elif out:
            position = rnd.randrange(len(out))
            out[position:position] = rnd.choice(NASTY).encode()[:50]
    return bytes(out)


def mutate_json(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        return {
            k: (
                rnd.choice([2**70, -(2**40), "x", None, [], {"number": 2**64}, 9e300, True])
                if rnd.random() < 0.08
                else mutate_json(v, rnd)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mutate_json(v, rnd) for v in value]
    return value


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.stem)
def test_regression_corpus(path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_TEXT)
    result = cli_runner().invoke(
        main,
        [
            "sync",
            "--dry-run",
            "--config",
            str(config),
            "--state",
            str(tmp_path / "state.db"),
            "--sacct-file",
            str(path),
            "--output",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    billed = {e["metadata"]["jobId"] for e in document["events"]}
    assert billed == {"500"}
    cpu = [e for e in document["events"] if e["sku"] == "CPU_HOUR"]
    assert sum(Decimal(str(e["quantity"])) for e in cpu) == 2
    assert [r["jobId"] for r in document["rejected"]] == ["666"]


def test_there_is_a_regression_corpus() -> None:
    assert len(REGRESSIONS) >= 7


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), rounds=st.integers(1, 12))
def test_mutated_captures_plan_or_reject_never_raise(seed: int, rounds: int) -> None:
    rnd = random.Random(seed)
    original = rnd.choice(SEEDS)
    if original.lstrip().startswith(b"{"):
        data = json.dumps(mutate_json(json.loads(original), rnd)).encode()
    else:
        data = mutate_text(original, rnd, rounds)
    try:
        parsed = parse_sacct(data, cluster="box", source="fuzz")
    except InputError:
        return  # the input as a whole is unreadable: a clean error, nothing half-done
    accounted(parsed, run_whole_path(parsed))


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from(NASTY), st.text(max_size=40)), min_size=20, max_size=20
    ),
    names=st.text(max_size=200),
)
def test_live_output_with_any_values_plans_or_rejects(values: list[str], names: str) -> None:
    fields = live_fields(with_job_name=True)
    delimiter = new_delimiter()
    row = {f: v.replace(delimiter, "") for f, v in zip(fields, values)}
    row["JobName"] = names
    data = (
        delimiter.join(fields) + delimiter + "\n" + delimiter.join(row[f] for f in fields)
    ).encode("utf-8", "surrogatepass") + (delimiter + "\n").encode()
    parsed = parse_live(data, delimiter=delimiter, fields=fields, cluster="box", source="fuzz")
    assert len(parsed.records) + len(parsed.rejected) == 1
    accounted(parsed, run_whole_path(parsed))
