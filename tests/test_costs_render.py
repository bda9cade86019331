"""The report's outputs: self-contained HTML, JSON, CSV and the terminal view."""

from __future__ import annotations

import csv
import io
import json
import random
import xml.etree.ElementTree as ET
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from slurm_tracker.costs.model import OTHER, UNALLOCATED, Report
from slurm_tracker.costs.render_data import SCHEMA, as_csv, as_json
from slurm_tracker.costs.render_html import OKABE_ITO, as_html
from slurm_tracker.costs.render_text import as_text, clean
from slurm_tracker.costs.steps import RunUsage
from tests.test_costs_model import PRICES, T0, report, usage

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = (
    '=HYPERLINK("http://evil.example")<script src="http://evil.example/x.js"></script>&amp;\x1b[31m'
)
EXTRA = PRICES + "  nodes: [{names: 'n[1-2]', node_hour: 4}]\n"


def sample(by: str = "account", hours: int = 3) -> Report:
    runs = [
        usage(job_id="1", cpu=8, cpu_used_s="3600", account="physics", mem_mb=4096,
              mem_used_mb="512", start_at=T0 + timedelta(minutes=10)),
        usage(job_id="2", cpu=2, elapsed_s=1200, account="chemistry"),
        usage(job_id="3", cpu=1, elapsed_s=600, account=HOSTILE, nodes=("unpriced",),
              start_at=T0 + timedelta(minutes=95)),
        usage(job_id="4", cpu=1, elapsed_s=300, account="bio", nodes=("n2",)),
    ]  # fmt: skip
    return report(runs, extra=EXTRA, hours=hours, by=by)


class _Balance(HTMLParser):
    VOID = frozenset({"meta", "br", "img", "input", "hr", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict[str, Any]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unbalanced </{tag}>")


def test_html_is_well_formed_and_self_contained() -> None:
    html = as_html(sample(), top=10)
    checker = _Balance()
    checker.feed(html)
    checker.close()
    assert checker.problems == [] and checker.stack == []
    root = ET.fromstring(html)  # well-formed XML too (expat accepts the doctype)
    assert root.tag == "html"
    names = {tag for tag, _ in checker.tags}
    assert "script" not in names and "link" not in names and "img" not in names
    for tag, attrs in checker.tags:
        assert "src" not in attrs and "href" not in attrs, tag
        for value in attrs.values():
            assert "url(" not in str(value) or str(value).startswith("url(#"), value
    assert "@import" not in html and "<script" not in html
    links = [
        v
        for _, attrs in checker.tags
        for k, v in attrs.items()
        if "http" in str(v) and not k.startswith("data-")  # data-series: a name, as text
    ]
    assert links == ["http://www.w3.org/2000/svg"]  # the SVG namespace, nothing to load
    assert "\x1b" not in html


def bars(html: str) -> list[ET.Element]:
    return [e for e in ET.fromstring(html).iter(f"{SVG}rect") if e.get("class") == "bar"]


def test_html_bars_match_the_json_series() -> None:
    rep = sample()
    html = as_html(rep, top=2)
    data = as_json(rep, top=2)
    expected: dict[tuple[int, str], float] = {}
    for index, interval in enumerate(data["series"]):
        for group, value in interval["values"].items():
            if value > 0:
                expected[(index, group)] = value
        if interval["unallocated"]:
            expected[(index, UNALLOCATED)] = interval["unallocated"]
    found = {(int(b.get("data-bin", -1)), b.get("data-series", "")): b for b in bars(html)}
    expected = {(index, clean(group, 1000)): v for (index, group), v in expected.items()}
    assert set(found) == set(expected)
    scale = {float(b.get("height", 0)) / float(b.get("data-value", 1)) for b in found.values()}
    assert max(scale) - min(scale) < 0.05 * max(scale)  # heights proportional to the values
    for key, bar in found.items():
        assert float(bar.get("data-value", 0)) == pytest.approx(expected[key], abs=1e-6)


def test_html_has_legend_axes_units_period_and_visible_empty_intervals() -> None:
    rep = report([usage(elapsed_s=900, cpu=2)], hours=2)  # 8 intervals, only the first used
    html = as_html(rep, top=10)
    root = ET.fromstring(html)
    texts = ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]
    assert "Time (UTC)" in texts
    assert "Cost per 15 minutes (EUR)" in texts
    assert any(t.startswith("physics (") for t in texts)  # legend with the total
    assert "2026-03-10 12:00 .. 2026-03-10 14:00 UTC" in html
    empty = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "empty"]
    assert len(empty) == 7 and len(bars(html)) == 1


def test_html_colours_are_okabe_ito_with_a_pattern_per_series() -> None:
    rep = report([usage(job_id=str(i), account=f"a{i}", cpu=i + 1) for i in range(4)], extra=PRICES)
    root = ET.fromstring(as_html(rep, top=10))
    patterns = list(root.iter(f"{SVG}pattern"))
    assert len(patterns) == 4
    colours = [p.find(f"{SVG}rect").get("fill") for p in patterns]  # type: ignore[union-attr]
    assert colours == list(OKABE_ITO[:4])
    overlays = [len(list(p)) for p in patterns]
    assert overlays[0] == 1 and all(n == 2 for n in overlays[1:])  # plain, then patterned


def test_long_periods_are_binned_coarser_in_the_chart() -> None:
    rep = report([usage(cpu=1, elapsed_s=3600)], hours=24 * 10)
    root = ET.fromstring(as_html(rep, top=10))
    slots = [e for e in root.iter(f"{SVG}rect") if e.get("class") in ("bar", "empty")]
    assert len(slots) == 240  # hourly bins for 10 days
    assert "Cost per hour (EUR)" in ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]


def test_json_schema_and_totals_equal_the_series() -> None:
    rep = sample()
    data = json.loads(json.dumps(as_json(rep, top=2)))
    assert data["schema"] == SCHEMA
    assert data["period"] == {"start": "2026-03-10T12:00:00Z", "end": "2026-03-10T15:00:00Z"}
    assert data["intervalSeconds"] == 900 and len(data["series"]) == 12
    assert data["currency"] == "EUR" and data["measure"] == "cost"
    # bio ran alone on n2: the whole node's cost of that interval is its overhead
    assert [r["group"] for r in data["rows"]][:2] == ["physics", "bio"]
    groups = {g for s in data["series"] for g in s["values"]}
    assert groups == {"physics", "bio", OTHER}
    charted = sum(sum(s["values"].values()) for s in data["series"])
    idle = sum(s["unallocated"] for s in data["series"])
    assert charted == pytest.approx(data["totals"]["totalCost"], abs=1e-5)
    assert idle == pytest.approx(data["totals"]["unallocatedCost"], abs=1e-5)
    grand = data["totals"]["totalCost"] + data["totals"]["unallocatedCost"]
    assert data["totals"]["grandTotalCost"] == pytest.approx(grand, abs=1e-5)
    physics = data["rows"][0]
    assert physics["cpuUtilization"] == pytest.approx(1 / 8)
    assert physics["gpuUtilization"] is None
    assert physics["hint"] == "asked 8 cores, used 1 on average; asked 4 GB memory, peak 0.5 GB"


def test_csv_rows_and_intervals_and_no_formula_injection() -> None:
    rep = sample()
    text = as_csv(rep, top=10)
    table = list(csv.DictReader(io.StringIO(text)))
    kinds = {r["record"] for r in table}
    assert kinds == {"group", "total", "unallocated", "interval"}
    hostile = [r for r in table if r["group"].startswith("'=HYPERLINK")]
    assert hostile, "a group name is written as text"
    formula = [r for r in table if r["group"][:1] in ("=", "+", "-", "@")]
    assert formula == []
    total = next(r for r in table if r["record"] == "total")
    intervals = sum(
        float(r["value"]) for r in table if r["record"] == "interval" and r["group"] != UNALLOCATED
    )
    assert intervals == pytest.approx(float(total["total_cost"]), abs=1e-5)


def test_terminal_view_has_the_table_hints_and_a_bar_line() -> None:
    text = as_text(sample(hours=24 * 3), top=2)
    shown = as_text(sample(), top=10)
    assert "Cost and utilisation by account" in text
    assert "(other)" in text and "(total)" in text and "(unallocated)" in text
    assert "Right-sizing hints:" in text
    assert "cost per hour" in text
    assert "\x1b" not in shown and "=HYPERLINK" in shown  # shown, without control characters


def test_terminal_view_of_an_empty_period() -> None:
    text = as_text(report([]), top=10)
    assert "(no job ran in this period)" in text
    assert "nothing in this period" in text


def test_unpriced_report_renders_core_hours() -> None:
    rep = report([usage(cpu=2)], extra="")
    assert "Core-hours per 15 minutes (core-hours)" in as_html(rep, top=3)
    data = as_json(rep, top=3)
    assert data["currency"] is None and data["rows"][0]["totalCost"] is None
    assert sum(sum(s["values"].values()) for s in data["series"]) == pytest.approx(2)
    assert "no prices" in as_text(rep, top=3)
    assert Decimal(0) == rep.unallocated_cost


# --- the example report in examples/ ---------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cost-report.html"
EXAMPLE_PRICES = (
    "pricing:\n"
    "  currency: EUR\n"
    "  partitions:\n"
    "    compute: {cpu_hour: 0.02, mem_gb_hour: 0.004}\n"
    "    gpu: {cpu_hour: 0.02, mem_gb_hour: 0.004, gpu_hour: 1.2}\n"
    "  nodes: [{names: 'cn[01-04]', node_hour: 0.9}, {names: 'gpu01', node_hour: 5}]\n"
)


def example_report() -> Report:
    """A day of a small made-up cluster (deterministic): the source of examples/."""
    rng = random.Random(12)
    teams = {  # account: (cores, utilisation, partition, GPUs, runs)
        "physics": (16, 0.12, "compute", 0, 14),
        "chemistry": (8, 0.85, "compute", 0, 22),
        "biology": (4, 0.6, "gpu", 2, 9),
        "astro": (2, 0.95, "compute", 0, 30),
        "climate": (4, 0.5, "compute", 0, 8),
    }
    runs: list[RunUsage] = []
    for account, (cores, util, partition, gpus, count) in teams.items():
        for number in range(count):
            start = T0 + timedelta(minutes=rng.randrange(0, 20 * 60, 5))
            elapsed = rng.randrange(900, 4 * 3600, 60)
            node = "gpu01" if partition == "gpu" else f"cn0{rng.randrange(1, 4)}"
            runs.append(
                usage(
                    job_id=f"{len(runs) + 100}", account=account, partition=partition,
                    start_at=start, elapsed_s=elapsed, cpu=cores, gpu=gpus,
                    mem_mb=cores * 4096, mem_used_mb=str(int(cores * 4096 * util * 0.7)),
                    cpu_used_s=str(int(cores * elapsed * util)), nodes=(node,),
                    user=f"user{number % 3}",
                )
            )  # fmt: skip
    return report(runs, extra=EXAMPLE_PRICES, hours=24)


def test_the_example_report_is_well_formed_and_self_contained() -> None:
    html = EXAMPLE.read_text(encoding="utf-8")
    root = ET.fromstring(html)
    assert root.tag == "html" and "<script" not in html
    assert len(bars(html)) > 100


if __name__ == "__main__":  # python -m tests.test_costs_render: writes examples/cost-report.html
    EXAMPLE.write_text(as_html(example_report(), top=4), encoding="utf-8")
