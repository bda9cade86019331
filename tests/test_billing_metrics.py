"""billing_metrics.py: ONE table of billing metrics, read by every place that knows metrics.

The proof that a metric is one entry: a test metric is added to the table (``using``, the
table's public switch) and nothing else, and it is read from AllocTRES in both forms (with the
GRES rule), accepted by the config, planned as count x hours, named in the dry run's totals,
kept with a correction and priced by the cost report; outside the ``with`` block it is
unknown again everywhere.

The example is a rate, as every metric is: GPU shards (``gres/shard``, Slurm's shared-GPU
GRES, typed like GPUs: ``gres/shard:a100``) held for the run's elapsed time. Consumed energy is
a total, not a rate, and does not fit (see the module's docstring).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from slurm_tracker import billing_metrics, corrections, models
from slurm_tracker.billing_metrics import (
    BUILTIN,
    MIB_PER_GB,
    MetricSpec,
    Registry,
    active,
    using,
)
from slurm_tracker.cli import main
from slurm_tracker.config import config_from_text
from slurm_tracker.costs.pricing import Prices
from slurm_tracker.costs.steps import RunUsage
from slurm_tracker.errors import ConfigError
from slurm_tracker.events import plan
from slurm_tracker.models import METRIC_UNITS, METRICS, SkuCharge, Tres
from slurm_tracker.parse import parse_tres, tres_from_json
from slurm_tracker.rating import catalog_from_data
from slurm_tracker.segments import split
from tests.conftest import cli_runner, shown
from tests.factories import T0, live_capture, record

SHARD = MetricSpec("shard", tres="gres/shard", unit="shard-hours", typed=True)
SHARDS = "cpu=2,gres/shard:a100=3,gres/shard:h100=1,mem=2G,node=1"
SHARDS_JSON = [
    {"type": "cpu", "name": "", "count": 2},
    {"type": "gres", "name": "shard:a100", "count": 3},
    {"type": "gres", "name": "shard:h100", "count": 1},
    {"type": "mem", "name": None, "count": 2048},
    {"type": "node", "name": "", "count": 1},
]


@pytest.fixture
def shards() -> Any:
    """The built-in table plus the one entry of the shard metric, for the test's time."""
    with using(active().extended(SHARD)) as registry:
        yield registry
    assert "shard" not in active()


# --- the built-in table is what the agent always billed ---------------------------------------


def test_the_built_in_table_names_units_and_resources() -> None:
    table = active()
    assert table.names == ("cpu", "gpu", "node", "mem", "billing")  # the config's message order
    assert tuple(METRICS) == table.names and list(METRICS) == list(table.names)
    assert dict(METRIC_UNITS) == {
        "cpu": "core-hours",
        "gpu": "GPU-hours",
        "node": "node-hours",
        "mem": "GB-hours",
        "billing": "billing-hours",
    }
    resources = {spec.name: spec.resource for spec in table}
    assert resources == {
        "cpu": "cpu",
        "mem": "mem",
        "gpu": "gpu",
        "node": "other",
        "billing": "other",
    }
    assert table["mem"].per == MIB_PER_GB == Decimal(1024) and table["mem"].field == "mem_mb"
    assert [spec.tres for spec in table] == ["cpu", "gres/gpu", "node", "mem", "billing"]
    assert [s.name for s in table if s.typed] == ["gpu"]
    assert models.MIB_PER_GB is billing_metrics.MIB_PER_GB
    assert "energy" not in table and "energy" not in METRICS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Shard"}, "lower-case words"),
        ({"field": "has space"}, "lower-case words"),
        ({"tres": "GRES/Shard"}, "not a lower-case AllocTRES name"),
        ({"resource": "disk"}, "resource 'disk'"),
        ({"per": Decimal(0)}, "not a positive number"),
        ({"per": Decimal("NaN")}, "not a positive number"),
        ({"unit": " "}, "no unit name"),
    ],
)
def test_an_entry_is_checked_when_it_is_made(kwargs: dict[str, Any], message: str) -> None:
    given: dict[str, Any] = {"name": "shard", "tres": "gres/shard", "unit": "shard-hours"}
    with pytest.raises(ValueError, match=message):
        MetricSpec(**{**given, **kwargs})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (MetricSpec("cpu", tres="license/x", unit="u"), "same name"),
        (MetricSpec("memory", tres="license/x", unit="u", field="mem_mb"), "same field"),
        (MetricSpec("gpu2", tres="gres/gpu", unit="u"), "same TRES"),
    ],
)
def test_a_table_refuses_two_metrics_that_would_collide(spec: MetricSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Registry(BUILTIN).extended(spec)


def test_using_swaps_the_table_for_the_block_only_even_on_error() -> None:
    built_in = active()
    with pytest.raises(RuntimeError), using(built_in.extended(SHARD)):
        assert "shard" in active() and "shard" in METRICS
        raise RuntimeError
    assert active() is built_in and "shard" not in METRICS


# --- one entry: everything that knows metrics knows the new one -----------------------------


def test_one_entry_is_read_from_both_tres_forms_with_the_gres_rule(shards: Registry) -> None:
    expected = Tres(cpu=2, mem_mb=Decimal(2048), node=1, shard=4)  # typed only: summed
    assert parse_tres(SHARDS) == tres_from_json(SHARDS_JSON) == expected
    assert parse_tres(SHARDS).amount("shard") == 4 and parse_tres(SHARDS).count("shard") == 4
    both = "gres/shard:a100=2,gres/shard=2"  # listed under both names: never added up
    assert parse_tres(both).amount("shard") == 2
    listed = [
        {"type": "gres", "name": "shard", "count": 2},
        {"type": "gres", "name": "shard:a100", "count": 2},
    ]
    assert tres_from_json(listed).amount("shard") == 2
    assert parse_tres("cpu=1,gres/gpu=1").amount("shard") == 0  # GPUs are not shards
    assert parse_tres("gres/shard=5").gpu == 0  # nor shards GPUs


def test_without_the_entry_the_same_tres_is_not_read() -> None:
    plain = Tres(cpu=2, mem_mb=Decimal(2048), node=1)
    assert parse_tres(SHARDS) == tres_from_json(SHARDS_JSON) == plain
    with pytest.raises(KeyError):
        plain.count("shard")
    with pytest.raises(TypeError, match="shard"):
        Tres(shard=1)


def test_the_parse_cache_follows_the_table() -> None:
    assert parse_tres(SHARDS).amount("cpu") == 2  # cached for the built-in table
    with using(active().extended(SHARD)):
        assert parse_tres(SHARDS).amount("shard") == 4  # not the cached answer
    assert parse_tres(SHARDS) == Tres(cpu=2, mem_mb=Decimal(2048), node=1)


def test_one_entry_is_a_metric_the_config_accepts(shards: Registry) -> None:
    text = (
        "cluster: box\naccounts: {default: a}\npartitions: {default: [{sku: S, metric: shard}]}\n"
    )
    config = config_from_text(text, "test.yaml", base_dir=Path("/tmp"))
    assert config.partitions.default == (SkuCharge("S", "shard"),)
    with using(Registry(BUILTIN)), pytest.raises(ConfigError) as refused:
        config_from_text(text, "test.yaml", base_dir=Path("/tmp"))
    assert 'unknown metric "shard"; expected one of: cpu, gpu, node, mem, billing' in str(
        refused.value
    )


def test_one_entry_is_planned_as_count_times_hours(shards: Registry) -> None:
    run = replace(record(elapsed_s=5400), tres=parse_tres(SHARDS))
    (event,) = plan(split(run, 0, 5400), "physics", [SkuCharge("SHARD_HOUR", "shard")])
    assert event.quantity == Decimal("6.000000")  # 4 shards x 1.5 h
    assert event.metric == event.metadata["metric"] == "shard"
    assert METRIC_UNITS["shard"] == "shard-hours"
    assert corrections.metric_of("shard") == "shard"


def test_one_entry_is_kept_with_a_correction_and_read_both_ways(shards: Registry) -> None:
    run = replace(record(), tres=parse_tres(SHARDS))
    kept = corrections.record_json(run)
    assert json.loads(kept)["tres"] == {
        "billing": 0,
        "cpu": 2,
        "gpu": 0,
        "mem_mb": "2048",
        "node": 1,
        "shard": 4,
    }
    assert corrections.record_from_json(kept).tres == run.tres
    # a row written before the metric existed: no key, so none held
    older = json.loads(kept)
    del older["tres"]["shard"]
    assert corrections.record_from_json(json.dumps(older)).tres.amount("shard") == 0
    # and the row read by a version without the metric: its key is ignored
    with using(Registry(BUILTIN)):
        assert corrections.record_from_json(kept).tres == Tres(cpu=2, mem_mb=Decimal(2048), node=1)
        assert corrections.metric_of("shard") is None


def test_one_entry_is_priced_by_the_cost_report_under_its_resource(shards: Registry) -> None:
    catalog = catalog_from_data(
        {
            "units": [
                {
                    "name": "usd",
                    "ratedInUsd": True,
                    "rules": [
                        {"effectiveFrom": "2026-01-01T00:00:00Z", "effectiveTo": None, "rate": 1}
                    ],
                    "skus": [
                        {
                            "code": "SHARD_HOUR",
                            "rules": [
                                {
                                    "effectiveFrom": "2026-01-01T00:00:00Z",
                                    "effectiveTo": None,
                                    "rate": "0.5",
                                }
                            ],
                        }
                    ],
                }
            ]
        },
        "catalog",
    )
    text = (
        "cluster: box\naccounts: {default: a}\n"
        "partitions: {default: [{sku: SHARD_HOUR, metric: shard}]}\n"
    )
    config = config_from_text(text, "test.yaml", base_dir=Path("/tmp"))
    prices = Prices("USD", partitions=config.partitions, catalog=catalog)
    run = RunUsage(replace(record(), tres=parse_tres(SHARDS)))
    (span,) = prices.spans(run, T0, T0 + timedelta(hours=1))
    assert span.per_hour == {"other": Decimal("2.0")}  # 4 shards x 0.5
    gpu_like = replace(SHARD, resource="gpu")
    with using(Registry(BUILTIN).extended(gpu_like)):
        (span,) = prices.spans(run, T0, T0 + timedelta(hours=1))
    assert span.per_hour == {"gpu": Decimal("2.0")}


T = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())
CONFIG = """
cluster: box
state_file: state.db
api: {organization: org, url: "http://127.0.0.1:9"}
accounts: {map: {physics: physics-2026}}
partitions:
  map:
    gpu: [{sku: SHARD_HOUR, metric: shard}, {sku: CPU_HOUR, metric: cpu}]
"""


def test_one_entry_goes_through_a_whole_dry_run(shards: Registry, tmp_path: Path) -> None:
    capture = tmp_path / "capture.txt"
    capture.write_bytes(
        live_capture(
            [
                {
                    "JobID": "21",
                    "Account": "physics",
                    "Partition": "gpu",
                    "Submit": str(T),
                    "Start": str(T),
                    "End": str(T + 5400),
                    "ElapsedRaw": "5400",
                    "State": "COMPLETED",
                    "AllocTRES": SHARDS,
                }
            ]
        )
    )
    (tmp_path / "config.yaml").write_text(CONFIG)
    args = [
        "sync",
        "--dry-run",
        "--sacct-file",
        str(capture),
        "--config",
        str(tmp_path / "config.yaml"),
    ]
    env = {"PW_API_KEY": "pwt_dGVzdA.secret-value"}
    table = cli_runner().invoke(main, args, env=env)
    assert table.exit_code == 0, shown(table)
    assert "SHARD_HOUR" in table.stdout and "shard-hours" in table.stdout
    document = cli_runner().invoke(main, [*args, "--output", "json"], env=env)
    assert document.exit_code == 0, shown(document)
    events = {e["sku"]: e for e in json.loads(document.stdout)["events"]}
    assert events["SHARD_HOUR"]["quantity"] == 6.0  # 4 shards x 1.5 h
    assert events["SHARD_HOUR"]["metadata"]["metric"] == "shard"
    assert events["CPU_HOUR"]["quantity"] == 3.0
    with using(Registry(BUILTIN)):
        refused = cli_runner().invoke(main, args, env=env)
    assert refused.exit_code == 3 and 'unknown metric "shard"' in shown(refused)  # config


# --- a size metric: the memory rule is an entry's, not memory's -------------------------------


def test_an_entry_with_a_size_is_read_with_units_and_billed_per_gb() -> None:
    burst = MetricSpec(
        "burst_buffer", tres="bb/datawarp", unit="GB-hours", per=MIB_PER_GB, amount="size"
    )
    with using(active().extended(burst)):
        tres = parse_tres("cpu=1,bb/datawarp=1.5G")
        assert tres.amount("burst_buffer") == Decimal(1536)
        assert tres.count("burst_buffer") == Decimal("1.5")
        assert tres_from_json([{"type": "bb", "name": "datawarp", "count": 1536}]) == Tres.of(
            {"burst_buffer": Decimal(1536)}
        )
        with pytest.raises(ValueError, match="is not an amount of memory"):
            parse_tres("bb/datawarp=lots")
