"""The HTML report rendered in a real browser: Chromium headless takes a screenshot and dumps
the DOM; the chart in both is checked against the JSON export of the same data.

A report (HTML and JSON) is made through the CLI from one synthetic sacct capture, with node
prices (overhead, "(other)" and "(unallocated)" in every stack) and without them (intervals
without cost). Then:

- the DOM as Chromium parsed it: one bar slot per JSON interval, a bar per non-zero value, each
  bar's height = plot height x value / the top of the y axis (read from the axis labels), the
  stacks sitting on the baseline in the legend's order, the legend's names and totals, the
  axis titles and tick labels;
- the screenshot (decoded here, no imaging library): the top of each painted stack is where
  the JSON says, within 2 pixels; an interval without cost shows its grey tick; each legend
  swatch has the colour of its series' bars, and no two series share one;
- the network: Chromium runs with every host name mapped to "not found" and a net log; the
  log must hold no URL request made for the page (Chromium's own background requests are told
  apart by their initiator: "not an origin"; a page's requests carry its file:// origin). A
  copy of the report with an image from the web proves the check sees one.

Chromium is Debian's ``chromium`` (installed by ``.ci/run``); in CI a missing browser fails,
elsewhere the tests skip with the reason. ``python -m tests.test_costs_browser`` writes the
README's screenshot of the example report (examples/cost-report.png).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import pytest

from slurm_tracker.cli import main
from tests.conftest import IN_CI, cli_runner, shown
from tests.test_costs_steps import E0, live, row

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cost-report.html"
SCREENSHOT = REPO / "examples" / "cost-report.png"
WINDOW = (1100, 700)  # wide enough for the 1000-pixel chart at its natural size
START, END = "2026-03-10T12:00:00Z", "2026-03-10T18:00:00Z"
H = 3600

CONFIG = """\
cluster: box
state_file: state.db
accounts: {default: any}
partitions: {default: CPU_HOUR}
pricing:
  currency: EUR
  partitions: {compute: {cpu_hour: 0.5, mem_gb_hour: 0.05}}
"""
NODE_PRICES = "  nodes: [{names: 'n1', node_hour: 6}]\n"


def _job(
    number: int, account: str, start_h: float, hours: float, cpus: int, node: str
) -> list[dict[str, str]]:
    """An allocation record and its batch step: 40% of the CPUs busy, 1 GiB per CPU used."""
    start = E0 + int(start_h * H)
    elapsed = int(hours * H)
    busy = int(cpus * elapsed * 0.4)
    common = {
        "Account": account,
        "Start": str(start),
        "End": str(start + elapsed),
        "Submit": str(start - 60),
        "ElapsedRaw": str(elapsed),
        "AllocTRES": f"cpu={cpus},mem={cpus * 2}G,node=1",
        "NodeList": node,
    }
    used = f"{busy // H:02d}:{busy % H // 60:02d}:{busy % 60:02d}"
    return [
        row(str(number), **common, ReqTRES=common["AllocTRES"], TotalCPU=used),
        row(f"{number}.batch", **common, TotalCPU=used, MaxRSS=f"{cpus}G"),
    ]


# account, start (hours after 12:00), hours, CPUs, node: five groups, shown as the top 3 and
# "(other)"; nothing runs after 16:30 and n2/n3 are not priced as nodes
JOBS = [
    ("physics", 0.0, 2.0, 8, "n1"),
    ("chemistry", 0.5, 0.75, 4, "n2"),
    ("biology", 1.0, 3.0, 2, "n2"),
    ("astro", 2.25, 0.8, 4, "n1"),
    ("climate", 3.5, 1.0, 1, "n3"),
    ("physics", 1.5, 2.0, 6, "n3"),
]


def find_chromium() -> str:
    """Path of the browser; skips (fails in CI) when there is none."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium not found: install it (Debian: apt-get install chromium) to render the "
    message += "HTML report in a real browser"
    if IN_CI:
        pytest.fail(message + " (.ci/run installs it: CI must have it)")
    pytest.skip(message)


@dataclass
class Browser:
    """What Chromium made of one HTML file."""

    dom: str
    png: bytes
    requests: list[dict[str, Any]]  # params of every URL request in the net log
    page_requests: list[str] = field(default_factory=list)  # URLs requested for the page


def render(html: Path, work: Path, window: tuple[int, int] = WINDOW) -> Browser:
    """Run Chromium headless once on ``html``: screenshot, DOM dump and a net log."""
    chromium = find_chromium()
    shot, netlog = work / "shot.png", work / "netlog.json"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a small /dev/shm
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing can reach a network anyway
        f"--log-net-log={netlog}",
        "--net-log-capture-mode=Default",
        f"--user-data-dir={work / 'profile'}",
        f"--window-size={window[0]},{window[1]}",
        f"--screenshot={shot}",
        "--dump-dom",
        html.resolve().as_uri(),
    ]
    env = {**os.environ, "HOME": str(work)}  # nothing written to the real profile
    done = subprocess.run(command, capture_output=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert shot.exists(), done.stderr.decode(errors="replace")[-2000:]
    log = json.loads(netlog.read_text(encoding="utf-8"))
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    requests = [
        event.get("params", {})
        for event in log["events"]
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in event.get("params", {})
    ]
    page = [
        str(p["url"])
        for p in requests
        if p.get("initiator") != "not an origin"
        or "file://" in str(p.get("network_isolation_key", ""))
        or "file://" in str(p.get("site_for_cookies", ""))
    ]
    return Browser(done.stdout.decode("utf-8"), shot.read_bytes(), requests, page)


# --- the DOM as the browser serialised it ------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    text: str = ""  # the element's text, without that of <title> elements inside it
    title: str = ""


class _Dom(HTMLParser):
    """Every element with its attributes and text (Chromium's dump is HTML, not XML)."""

    VOID = frozenset({"meta", "br", "img", "input", "hr", "link", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.nodes: list[Node] = []
        self.open: list[Node] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.nodes.append(node)
        if tag not in self.VOID:
            self.open.append(node)

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            if self.open.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        titled = next((n for n in reversed(self.open) if n.tag == "title"), None)
        if titled is not None:
            titled.text += data
            index = self.open.index(titled)
            if index > 0:
                self.open[index - 1].title += data
            return
        for node in self.open:
            node.text += data


def dom_nodes(html: str) -> list[Node]:
    parser = _Dom()
    parser.feed(html)
    parser.close()
    return parser.nodes


@dataclass
class Chart:
    """The chart as read from the DOM."""

    plot: tuple[float, float, float, float]  # x, y, width, height of the plot area
    y_ticks: list[tuple[float, float]]  # (value, y) of the y axis labels
    x_ticks: list[str]
    axis_titles: list[str]
    legend: list[str]
    bars: list[Node]
    empty: list[Node]
    swatches: list[Node]

    @property
    def baseline(self) -> float:
        return self.plot[1] + self.plot[3]

    @property
    def y_max(self) -> float:
        return max(value for value, _ in self.y_ticks)


def read_chart(html: str) -> Chart:
    nodes = dom_nodes(html)
    tags = [n.tag for n in nodes]
    assert tags.count("svg") == 1, "one chart"
    svg = nodes[tags.index("svg") :]
    plot = next(n for n in svg if n.tag == "rect" and n.attrs.get("fill") == "#fafafa")
    texts = [n for n in svg if n.tag == "text"]
    return Chart(
        plot=tuple(float(plot.attrs[k]) for k in ("x", "y", "width", "height")),  # type: ignore[arg-type]
        y_ticks=[
            (float(n.text.replace(",", "")), float(n.attrs["y"]))
            for n in texts
            if n.attrs.get("text-anchor") == "end"
        ],
        x_ticks=[n.text for n in texts if n.attrs.get("class") == "tick"],
        axis_titles=[n.text for n in texts if n.attrs.get("class") == "axis-label"],
        legend=[n.text for n in texts if n.attrs.get("class") == "legend-item"],
        bars=[n for n in svg if n.tag == "rect" and n.attrs.get("class") == "bar"],
        empty=[n for n in svg if n.tag == "rect" and n.attrs.get("class") == "empty"],
        swatches=[n for n in svg if n.tag == "rect" and n.attrs.get("class") == "swatch"],
    )


# --- the screenshot: a small PNG reader (8-bit RGB/RGBA, not interlaced) ----------------------


@dataclass
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytearray]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        line = self.rows[y]
        r, g, b = line[x * self.channels : x * self.channels + 3]
        return r, g, b


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def read_png(data: bytes) -> Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + (left + previous[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                corner = previous[i - channels] if i >= channels else 0
                line[i] = (line[i] + _paeth(left, previous[i], corner)) & 255
        rows.append(line)
        previous = line
    return Image(width, height, channels, rows)


PLOT_BACKGROUND = (250, 250, 250)  # #fafafa


def _background(pixel: tuple[int, int, int]) -> bool:
    """The plot's background or a grid line over it (greys from #e0e0e0 to #fafafa)."""
    r, g, b = pixel
    return r == g == b and 0xE0 <= r <= 0xFA


def plot_origin(image: Image, chart: Chart) -> tuple[int, int]:
    """Where the chart's plot area landed in the screenshot: (x, y) of its top left corner.

    The first row where the plot's background colour spans most of its width lies just below
    the top grid line (drawn on the plot's top edge and blended over two rows)."""
    width = int(chart.plot[2])
    for y in range(image.height):
        xs = [x for x in range(image.width) if image.pixel(x, y) == PLOT_BACKGROUND]
        if len(xs) > width // 2:
            assert xs[-1] - xs[0] + 1 == pytest.approx(width, abs=2), "drawn at natural size"
            return xs[0], y - 1
    raise AssertionError("the plot area is not in the screenshot")


def painted_top(image: Image, x: int, top: int, bottom: int) -> int:
    """The first row from the top of the plot whose pixel at ``x`` is not background."""
    for y in range(top, bottom + 1):
        if not _background(image.pixel(x, y)):
            return y
    return bottom + 1


# --- the reports ------------------------------------------------------------------------------


@dataclass
class Rendered:
    data: dict[str, Any]  # the JSON export of the same capture and period
    chart: Chart  # from the browser's DOM
    image: Image
    browser: Browser


def make_report(work: Path, *, node_prices: bool) -> tuple[Path, dict[str, Any]]:
    """The HTML report (a file) and the JSON one of a capture, made through the CLI."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(CONFIG + (NODE_PRICES if node_prices else ""))
    rows = [r for number, job in enumerate(JOBS, start=20) for r in _job(number, *job)]
    (work / "capture.txt").write_bytes(live(rows, "|#|"))
    common = ["report", "--config", str(work / "config.yaml"), "--sacct-file",
              str(work / "capture.txt"), "--start", START, "--end", END, "--top", "3"]  # fmt: skip
    html = work / "report.html"
    made = cli_runner().invoke(main, [*common, "--output", "html", "--file", str(html)])
    assert made.exit_code == 0, shown(made)
    exported = cli_runner().invoke(main, [*common, "--output", "json"])
    assert exported.exit_code == 0, shown(exported)
    return html, json.loads(exported.stdout)


@pytest.fixture(scope="module", params=[True, False], ids=["node-prices", "no-node-prices"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    work = tmp_path_factory.mktemp("browser")
    html, data = make_report(work, node_prices=request.param)
    browser = render(html, work)
    return Rendered(data, read_chart(browser.dom), read_png(browser.png), browser)


def stacks(data: dict[str, Any]) -> Iterator[list[tuple[str, float]]]:
    """Per JSON interval, its (series, value) bottom-up in the chart's order: the top groups
    by total cost, "(other)", then "(unallocated)"; zero values left out."""
    order = [r["group"] for r in data["rows"][: data["top"]]] + ["(other)"]
    for interval in data["series"]:
        values = interval["values"]
        stack = [(name, values[name]) for name in order if values.get(name, 0) > 0]
        assert len(stack) == sum(1 for v in values.values() if v > 0), "a series not charted"
        if interval["unallocated"]:
            stack.append(("(unallocated)", interval["unallocated"]))
        yield stack


# --- the tests --------------------------------------------------------------------------------


def test_the_browser_draws_a_slot_per_interval_and_a_bar_per_value(rendered: Rendered) -> None:
    data, chart = rendered.data, rendered.chart
    expected = list(stacks(data))
    assert len(expected) == len(data["series"]) == 24  # 6 hours of 15 minutes
    assert len(chart.bars) == sum(len(s) for s in expected)
    assert sorted(int(n.attrs["data-bin"]) for n in chart.empty) == [
        number for number, stack in enumerate(expected) if not stack
    ]
    found: dict[int, list[str]] = {}
    for bar in chart.bars:
        found.setdefault(int(bar.attrs["data-bin"]), []).append(bar.attrs["data-series"])
    assert found == {n: [name for name, _ in s] for n, s in enumerate(expected) if s}


def test_bar_heights_follow_the_json_and_the_y_axis(rendered: Rendered) -> None:
    data, chart = rendered.data, rendered.chart
    x0, top, width, height = chart.plot
    ticks = sorted(chart.y_ticks)
    assert len(ticks) == 6 and ticks[0][0] == 0
    step = ticks[1][0]
    for number, (value, y) in enumerate(ticks):  # evenly spaced labels, 0 on the baseline
        assert value == pytest.approx(step * number)
        assert y - 4 == pytest.approx(chart.baseline - height * number / 5, abs=0.06)
    totals = [sum(v for _, v in stack) for stack in stacks(data)]
    assert max(totals) <= chart.y_max <= 2 * max(totals)  # the scale fits the tallest stack
    slot = width / len(data["series"])
    bars = iter(chart.bars)
    for number, stack in enumerate(stacks(data)):
        bottom = chart.baseline
        for name, value in stack:
            bar = next(bars)
            assert (int(bar.attrs["data-bin"]), bar.attrs["data-series"]) == (number, name)
            h, y = float(bar.attrs["height"]), float(bar.attrs["y"])
            assert h == pytest.approx(height * value / chart.y_max, abs=0.006), (number, name)
            assert y + h == pytest.approx(bottom, abs=0.011)  # stacked, on the baseline
            assert float(bar.attrs["x"]) == pytest.approx(x0 + number * slot, abs=0.006)
            bottom = y
        assert bottom >= top - 0.01


def test_the_legend_names_the_series_with_their_totals(rendered: Rendered) -> None:
    data, chart = rendered.data, rendered.chart
    rows = data["rows"]
    shown_rows = rows[: data["top"]]
    expected = [(r["group"], r["totalCost"]) for r in shown_rows]
    assert len(rows) > data["top"]
    expected.append(("(other)", sum(r["totalCost"] for r in rows[data["top"] :])))
    if data["totals"]["unallocatedCost"]:
        expected.append(("(unallocated)", data["totals"]["unallocatedCost"]))
    legend = []
    for text in chart.legend:
        name, _, amount = text.rpartition(" (")
        legend.append((name, float(amount.rstrip(")").replace(",", ""))))
    assert [n for n, _ in legend] == [n for n, _ in expected]
    for (_, shown_total), (name, total) in zip(legend, expected):
        assert shown_total == pytest.approx(total, abs=0.0051), name


def test_the_axes_have_titles_units_and_the_period(rendered: Rendered) -> None:
    chart = rendered.chart
    assert chart.axis_titles == ["Cost per 15 minutes (EUR)", "Time (UTC)"]
    assert chart.x_ticks == [f"03-10 {hour}:00" for hour in range(12, 19)]
    assert "Period: 2026-03-10 12:00 .. 2026-03-10 18:00 UTC" in rendered.browser.dom


def test_the_screenshot_shows_each_stack_at_its_height(rendered: Rendered) -> None:
    data, chart, image = rendered.data, rendered.chart, rendered.image
    assert (image.width, image.height) == WINDOW
    left, top = plot_origin(image, chart)
    _, _, width, height = chart.plot
    slot = width / len(data["series"])
    bottom = top + int(height)  # the x axis, blended over this row and the one above
    measured, wanted = [], []
    for number, stack in enumerate(stacks(data)):
        x = left + int(slot * number + slot / 2)
        total = sum(v for _, v in stack)
        measured.append(painted_top(image, x, top, bottom) - top)
        if stack:
            wanted.append(round(height - total * height / chart.y_max))
        else:  # a grey tick on the axis, 3 pixels high
            wanted.append(int(height) - 3)
            assert image.pixel(x, bottom - 2) == (0xCC, 0xCC, 0xCC), number
    assert measured == pytest.approx(wanted, abs=2), list(zip(measured, wanted))
    assert min(wanted) < height / 2, "some stacks are tall"


def _main_colour(image: Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """The most frequent colour in a box (a hatched fill's own colour, not its hatching)."""
    x0, y0, x1, y1 = box
    assert x1 > x0 and y1 > y0, f"too small to see its colour: {box}"
    seen = Counter(image.pixel(x, y) for x in range(x0, x1) for y in range(y0, y1))
    return seen.most_common(1)[0][0]


def test_the_screenshot_legend_matches_the_bars(rendered: Rendered) -> None:
    chart, image = rendered.chart, rendered.image
    left, top = plot_origin(image, chart)
    dx, dy = left - chart.plot[0], top - chart.plot[1]

    def box(node: Node) -> tuple[int, int, int, int]:
        x, y = float(node.attrs["x"]) + dx, float(node.attrs["y"]) + dy
        w, h = float(node.attrs["width"]), float(node.attrs["height"])
        return round(x) + 2, round(y) + 2, round(x + w) - 2, round(y + h) - 2

    names = [text.rpartition(" (")[0] for text in chart.legend]
    assert len(chart.swatches) == len(names)
    colours = {name: _main_colour(image, box(s)) for name, s in zip(names, chart.swatches)}
    assert len(set(colours.values())) == len(names), colours  # told apart by colour too
    for name in names:
        bar = max(
            (b for b in chart.bars if b.attrs["data-series"] == name),
            key=lambda b: float(b.attrs["height"]),
        )
        assert _main_colour(image, box(bar)) == colours[name], name


def test_nothing_is_loaded_from_the_network(rendered: Rendered) -> None:
    browser = rendered.browser
    assert browser.page_requests == [], browser.requests
    assert len(rendered.chart.bars) > 10, "the page was loaded"


def test_the_network_check_sees_a_request_of_the_page(tmp_path: Path) -> None:
    html, _ = make_report(tmp_path / "report", node_prices=False)
    text = html.read_text(encoding="utf-8")
    font = "@font-face{font-family:f;src:url(https://fonts.invalid/f.woff2)}h1{font-family:f}"
    text = text.replace("</style>", font + "</style>")
    html.write_text(text.replace("</h1>", '</h1><img src="http://report.invalid/logo.png"/>'))
    browser = render(html, tmp_path)
    wanted = ["http://report.invalid/logo.png", "https://fonts.invalid/f.woff2"]
    assert sorted(set(browser.page_requests)) == wanted


def test_the_readme_screenshot_is_a_small_png_of_the_example() -> None:
    data = SCREENSHOT.read_bytes()
    assert len(data) < 300_000
    image_width, image_height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and image_width >= 1000 and image_height >= 600


def write_screenshot() -> None:
    """examples/cost-report.png: the example report as Chromium headless shows it."""
    work = Path(tempfile.mkdtemp(prefix="cost-report-shot-"))
    try:
        browser = render(EXAMPLE, work, window=(1400, 840))
        assert browser.page_requests == [], browser.page_requests
        SCREENSHOT.write_bytes(browser.png)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.test_costs_browser: writes examples/cost-report.png
    write_screenshot()
