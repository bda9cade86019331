"""Smoke runs of the benchmarks: a few seconds each, so that they cannot rot. They check that
a benchmark runs and prints its figures; they assert no timing (shared, noisy machines)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from slurm_tracker.api import AllocationsClient
from tests.conftest import REPO
from tests.emulator import DEFAULT_API_KEY, DEFAULT_ORGANIZATION, Emulator


def test_the_delivery_benchmark_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_delivery.py",
            "--events",
            "40",
            "--latency",
            "5",
            "0",
            "--concurrency",
            "1",
            "4",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:6] == ["latency", "conc", "events", "seconds", "events/s", "bound"]
    assert len(rows) == 4
    for row in rows:
        fields = row.split()
        assert fields[2] == "40"
        assert float(fields[7]) < 1  # commits per event: batched, not 2 per event


class Waits(threading.Event):
    """The emulator's stop event, recording how long each answer was held (never waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.held.append(float(timeout or 0))
        return False


def test_the_emulator_delays_every_api_answer_by_its_latency() -> None:
    with Emulator(latency_s=0.02) as emulator:
        waits = Waits()
        emulator._stopping = waits
        client = AllocationsClient(emulator.base_url, DEFAULT_ORGANIZATION, DEFAULT_API_KEY)
        client.list_units()
        assert client.find_usage("physics", "st1:none") is None
        assert waits.held == [0.02, 0.02]
    with pytest.raises(ValueError, match="latency"):
        Emulator(latency_s=-1)


def test_the_state_benchmark_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_state.py",
            *("--known", "3000", "--running", "200", "--finished", "100", "--short", "10"),
            *("--accounts", "5", "--scale", "0.5", "--days", "0.25"),
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout[done.stdout.index("figure") :].splitlines()
    assert table[0].split() == ["figure", "measured", "target", "unit", "ratio"]
    figures = {line[:34].strip(): line[34:].split() for line in table[1:]}
    assert set(figures) == {
        "steady-state sync, state work",
        "steady-state file per tracked run",
        "month: file per tracked run",
    }
    for measured, target, _unit, ratio in figures.values():
        assert float(measured.replace(",", "")) > 0 and float(target.replace(",", "")) > 0
        assert float(ratio) >= 0
    assert "72 syncs over 0.25 days" in done.stdout


def test_one_command_runs_every_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--list"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scripts = [line.split()[0] for line in done.stdout.splitlines()]
    assert scripts == ["bench_pipeline.py", "bench_delivery.py", "bench_state.py"]
    present = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert sorted(scripts) == present  # a new benchmark is run by run_all.py too
