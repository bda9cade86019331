"""`slurm-tracker report` through click's CliRunner, and the `pricing` config section."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import Result

from slurm_tracker.cli import main
from slurm_tracker.config import ResourcePrices, config_from_text
from slurm_tracker.errors import ConfigError
from tests.conftest import cli_runner, shown
from tests.test_costs_steps import E0, live, row

CONFIG = """\
cluster: box
state_file: state.db
accounts: {map: {physics: phys-2026}}
partitions: {map: {compute: CPU_HOUR}}
pricing:
  currency: EUR
  partitions: {compute: {cpu_hour: 0.5, mem_gb_hour: 0.25}}
  nodes: [{names: "n[1-2]", node_hour: 4}]
"""
START, END = "2026-03-10T12:00:00Z", "2026-03-10T14:00:00Z"


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text(CONFIG)
    rows = [
        row("7", TotalCPU="01:00:00"),  # 4 CPUs, 8 GiB, 1 h from 12:00
        row("7.batch", TotalCPU="01:00:00", MaxRSS="2G"),
        row("8", JobIDRaw="8", Account="chemistry", AllocTRES="cpu=1,node=1", NodeList="n2"),
    ]
    # a saved capture: any delimiter with a header line (here the random one of a live query)
    (tmp_path / "capture.txt").write_bytes(live(rows, "|#|"))
    return tmp_path


def run(setup: Path, *args: str) -> Result:
    return cli_runner().invoke(
        main,
        ["report", "--config", str(setup / "config.yaml"), "--sacct-file",
         str(setup / "capture.txt"), "--start", START, "--end", END, *args],
    )  # fmt: skip


def test_table(setup: Path) -> None:
    result = run(setup)
    assert result.exit_code == 0, shown(result)
    out = result.stdout
    assert "Cost and utilisation by account, 2026-03-10 12:00 .. 2026-03-10 14:00 UTC (EUR)" in out
    assert "physics" in out and "chemistry" in out and "(unallocated)" in out
    assert "cost per 15 minutes" in out


def test_json_figures(setup: Path) -> None:
    result = run(setup, "--output", "json", "--by", "allocation")
    assert result.exit_code == 0, shown(result)
    data = json.loads(result.stdout)
    rows = {r["group"]: r for r in data["rows"]}
    assert set(rows) == {"phys-2026", "(unmapped)"}
    phys = rows["phys-2026"]
    assert phys["cpuHours"] == 4 and phys["cpuUtilization"] == 0.25
    assert phys["memGBHours"] == 8 and phys["memUtilization"] == 0.25
    assert phys["allocatedCost"] == 4 * 0.5 + 8 * 0.25
    # two nodes x 4/h x 2 h = 16: what the runs do not pay is overhead or unallocated
    assert data["totals"]["grandTotalCost"] == pytest.approx(16)


def test_csv_and_html_files(setup: Path) -> None:
    for output in ("csv", "html"):
        target = setup / f"report.{output}"
        result = run(setup, "--output", output, "--file", str(target))
        assert result.exit_code == 0, shown(result)
        assert result.stdout == ""
        assert target.stat().st_mode & 0o777 == 0o644
    assert ET.fromstring((setup / "report.html").read_text()).tag == "html"
    assert (setup / "report.csv").read_text().startswith("record,group,start,end,runs")


def test_empty_capture_and_period_without_jobs(setup: Path) -> None:
    (setup / "capture.txt").write_bytes(b"")
    result = run(setup)
    assert result.exit_code == 0, shown(result)
    assert "(no job ran in this period)" in result.stdout


BEFORE = {"Start": str(E0 - 7200), "End": str(E0 - 3600), "ElapsedRaw": "3600"}
AT_START = {"End": str(E0), "ElapsedRaw": "0"}
NEVER = {"Start": "Unknown", "End": "Unknown", "ElapsedRaw": "0"}
BAD_INPUT = {  # the list: what sacct gives, and the utilisation (CPU, memory) expected
    "period-without-jobs": (
        [row("5", **BEFORE), row("5.batch", **BEFORE, TotalCPU="00:10:00", MaxRSS="1G")],
        None,
    ),
    "pending-never-started": (
        [row("6", **NEVER, State="PENDING", NodeList="None assigned", AllocTRES="")],
        None,
    ),
    "run-without-steps": ([row("7", TotalCPU="")], (None, None)),
    "run-without-steps-own-total-cpu": ([row("7", TotalCPU="02:00:00")], (0.5, None)),
    "missing-maxrss-and-totalcpu": (
        [row("8", TotalCPU=""), row("8.batch", TotalCPU="", MaxRSS="")],
        (None, None),
    ),
    "zero-length-run": (
        [row("9", **AT_START), row("9.batch", **AT_START, TotalCPU="00:00:00", MaxRSS="0")],
        (None, None),
    ),
}


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in the JSON report")


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_clear_figures_in_every_output(setup: Path, case: str) -> None:
    rows, utilisation = BAD_INPUT[case]
    (setup / "capture.txt").write_bytes(live(rows, "|"))
    outputs = {}
    for output in ("table", "json", "csv", "html"):
        result = run(setup, "--output", output)
        assert result.exit_code == 0, shown(result)
        assert "Traceback" not in shown(result) and "rror" not in result.stderr
        outputs[output] = result.stdout
    data = json.loads(outputs["json"], parse_constant=_no_constant)  # no NaN, no Infinity
    assert data["rejected"] == 0
    table = outputs["table"]
    if utilisation is None:  # nothing ran in the period: no row, idle nodes still cost
        assert data["rows"] == [] and data["totals"]["runs"] == 0
        assert "(no job ran in this period)" in table
        assert "No job ran in this period." in outputs["html"]
        assert data["totals"]["unallocatedCost"] == 16
    else:
        (only,) = data["rows"]
        assert (only["cpuUtilization"], only["memUtilization"]) == utilisation
        line = next(x for x in table.splitlines() if x.startswith("physics"))
        shown_util = [c for c in line.split() if c == "n/a" or c.endswith("%")]
        expected = [f"{u:.0%}" if u is not None else "n/a" for u in utilisation]
        assert shown_util == [*expected, "n/a"]  # CPU, memory, GPU (no GPU: unknown)
    assert data["totals"]["grandTotalCost"] == pytest.approx(16)  # 2 nodes x 4/h x 2 h
    for output in ("csv", "html", "table"):
        assert not re.search(r"\b(nan|inf|infinity)\b", outputs[output], re.IGNORECASE), output
    assert ET.fromstring(outputs["html"]).tag == "html"


def test_bad_periods_are_usage_errors(setup: Path) -> None:
    runner = cli_runner()
    config = str(setup / "config.yaml")
    backwards = runner.invoke(main, ["report", "--config", config, "--start", END, "--end", START])
    assert backwards.exit_code == 2 and "--end must be after --start" in shown(backwards)
    future = runner.invoke(main, ["report", "--config", config, "--start", "2999-01-01"])
    assert future.exit_code == 2 and "future" in shown(future)


def test_an_unreadable_capture_is_a_usage_error(setup: Path) -> None:
    (setup / "capture.txt").write_bytes(b"not sacct output\n")
    result = run(setup)
    assert result.exit_code == 2, shown(result)
    assert "not a sacct header" in shown(result)


def test_rejected_records_are_counted_not_fatal(setup: Path) -> None:
    data = (setup / "capture.txt").read_bytes() + b"box|#|9|#|9|#|broken|#|\n"
    (setup / "capture.txt").write_bytes(data)
    result = run(setup)
    assert result.exit_code == 0, shown(result)
    assert "1 sacct record(s) could not be read" in result.stdout


# --- the pricing section ---------------------------------------------------------------------

BASE = "cluster: box\naccounts: {default: a}\npartitions: {default: CPU_HOUR}\n"


def test_pricing_section_is_read() -> None:
    cfg = config_from_text(
        BASE + "pricing:\n  partitions: {gpu: {gpu_hour: 2.5}, 'big*': {cpu_hour: '0.1'}}\n"
        "  default: {cpu_hour: 0.02}\n  nodes: [{names: 'n[01-04]', node_hour: 1.2}]\n",
        "t.yaml",
    )
    pricing = cfg.pricing
    assert pricing is not None and pricing.currency == "USD"
    assert pricing.exact == {"gpu": ResourcePrices(gpu_hour=Decimal("2.5"))}
    assert pricing.patterns == (("big*", ResourcePrices(cpu_hour=Decimal("0.1"))),)
    assert pricing.default == ResourcePrices(cpu_hour=Decimal("0.02"))
    assert pricing.nodes[0].node_hour == Decimal("1.2")


def test_no_pricing_section() -> None:
    assert config_from_text(BASE, "t.yaml").pricing is None


def test_pricing_problems_are_all_listed() -> None:
    text = BASE + (
        "pricing:\n"
        "  currency: '$$'\n"
        "  partitions: {gpu: {gpu_hour: -1}, cpu: {cpu_hours: 1}, x: {}}\n"
        "  nodes: [{names: 'n[1-'}, {names: 'n[1-2]', node_hour: abc}, {node_hour: 1}]\n"
        "  discount: 5\n"
    )
    with pytest.raises(ConfigError) as info:
        config_from_text(text, "t.yaml")
    message = str(info.value)
    for expected in (
        "pricing.currency",
        "is not a currency name",
        "pricing.partitions.gpu.gpu_hour",
        "must be 0 or more",
        "pricing.partitions.cpu.cpu_hours",
        "pricing.partitions.x",
        "give at least one of",
        "node_hour: required",
        "pricing.nodes[1].node_hour",
        "names: required",
        "pricing.discount",
    ):
        assert expected in message, (expected, message)


def test_a_pricing_section_pricing_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="prices nothing"):
        config_from_text(BASE + "pricing: {currency: EUR}\n", "t.yaml")
