"""Reading runs with their steps for the cost report (slurm_tracker.costs.steps, reading)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

import pytest

from slurm_tracker import sacct
from slurm_tracker.config import config_from_text
from slurm_tracker.costs.reading import read_saved_usage, read_usage
from slurm_tracker.costs.steps import (
    cpu_seconds,
    expand_hostlist,
    memory_mb,
    runs_from_rows,
)
from slurm_tracker.errors import SacctUnavailable
from slurm_tracker.parse import live_rows

D = Decimal
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
E0 = int(T0.timestamp())
CONFIG = config_from_text(
    "cluster: box\naccounts: {default: a}\npartitions: {default: CPU_HOUR}\n",
    "test.yaml",
    base_dir=Path("/tmp"),
)
FIELDS = sacct.report_fields(True)


def row(job: str, **given: str) -> dict[str, str]:
    step = "." in job
    values = {
        "Cluster": "box",
        "JobID": job,
        "JobIDRaw": job,
        "Account": "physics",
        "Partition": "" if step else "compute",
        "User": "" if step else "alice",
        "Submit": str(E0 - 60),
        "Start": str(E0),
        "End": str(E0 + 3600),
        "ElapsedRaw": "3600",
        "State": "COMPLETED",
        "AllocTRES": "cpu=4,mem=8G,node=1",
        "ReqTRES": "" if step else "cpu=4,mem=8G,node=1",
        "ReqMem": "8G",
        "NNodes": "1",
        "NodeList": "n1",
        "NTasks": "1" if step else "",
        "TotalCPU": "00:00:00",
        "MaxRSS": "",
        "AveRSS": "",
        "TRESUsageInAve": "",
        "TRESUsageInMax": "",
        "JobName": "batch" if step else "name | with\nnewline",
    }
    values.update(given)
    return values


def live(rows: list[dict[str, str]], delimiter: str) -> bytes:
    lines = [delimiter.join(FIELDS) + delimiter]
    lines += [delimiter.join(r[f] for f in FIELDS) + delimiter for r in rows]
    return ("\n".join(lines) + "\n").encode()


def read(rows: list[dict[str, str]]) -> Any:
    delimiter = sacct.new_delimiter()
    framed = live_rows(live(rows, delimiter), delimiter=delimiter, fields=FIELDS, source="test")
    return runs_from_rows(framed, cluster="box", tz=timezone.utc)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:08.705", D("8.705")),
        ("21:49.123", D("1309.123")),
        ("12:34:56", D(45296)),
        ("1-02:03:04", D(93784)),
        ("1-02:03:04.5", D("93784.5")),
        ("", None),
        ("garbage", None),
        ("00:01.x", None),
    ],
)
def test_total_cpu_keeps_fractions(text: str, seconds: Optional[Decimal]) -> None:
    assert cpu_seconds(text) == seconds


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("219476K", D("214.33203125")),
        ("1.5G", D(1536)),
        ("300M", D(300)),
        ("2048", D(2)),  # RSS without a unit is KiB
        ("", None),
        ("12Q", None),
    ],
)
def test_memory_units(text: str, mib: Optional[Decimal]) -> None:
    assert memory_mb(text) == mib


def test_cpu_used_is_the_sum_of_the_steps_total_cpu() -> None:
    usage = read(
        [
            row("7", TotalCPU="00:30.000"),  # the allocation's own figure is not added
            row("7.batch", TotalCPU="00:10.250"),
            row("7.0", TotalCPU="00:20.500", JobName="x"),
            row("7.extern", TotalCPU="00:00.000"),
        ]
    )
    (run,) = usage.runs
    assert run.steps == 3
    assert run.cpu_used_s == D("30.750")


def test_a_run_without_steps_uses_its_own_total_cpu() -> None:
    (run,) = read([row("7", TotalCPU="01:00.000")]).runs
    assert (run.steps, run.cpu_used_s, run.mem_used_mb) == (0, D(60), None)


def test_max_rss_is_per_task_so_a_multi_task_step_counts_every_task() -> None:
    usage = read(
        [
            row("7"),
            row("7.batch", MaxRSS="100M", AveRSS="100M", NTasks="1"),
            # 4 tasks: MaxRSS is the largest ONE task (2 GiB), AveRSS their mean (1.5 GiB)
            row("7.0", MaxRSS="2G", AveRSS="1536M", NTasks="4"),
        ]
    )
    assert usage.runs[0].mem_used_mb == D(6144)  # peak over steps of AveRSS x NTasks


def test_memory_used_falls_back_to_tres_usage() -> None:
    usage = read([row("7"), row("7.batch", TRESUsageInMax="cpu=00:00:01,mem=512M,pages=0")])
    assert usage.runs[0].mem_used_mb == D(512)


@pytest.mark.parametrize(
    ("alloc", "req_tres", "req_mem", "mib"),
    [
        ("cpu=4,mem=8G,node=1", "", "", D(8192)),  # what Slurm reserved
        ("cpu=4,node=1", "cpu=4,mem=3G,node=1", "", D(3072)),
        ("cpu=4,node=2", "", "2000Mc", D(8000)),  # per CPU (Slurm < 21.08)
        ("cpu=4,node=2", "", "4Gn", D(8192)),  # per node
        ("cpu=4,node=2", "", "1000M", D(1000)),  # 21.08+: the whole job
        ("cpu=4,node=1", "", "", D(0)),
    ],
)
def test_requested_memory(alloc: str, req_tres: str, req_mem: str, mib: Decimal) -> None:
    usage = read([row("7", AllocTRES=alloc, ReqTRES=req_tres, ReqMem=req_mem, NNodes="2")])
    assert usage.runs[0].mem_requested_mb == mib


def test_gpu_use_only_when_recorded() -> None:
    runs = read(
        [
            row("7", AllocTRES="cpu=1,gres/gpu=2,node=1"),
            row("7.0", TRESUsageInAve="cpu=1,gres/gpuutil=50,gres/gpumem=1G", NTasks="2"),
            row("8", JobIDRaw="8", AllocTRES="cpu=1,gres/gpu=1,node=1"),
            row("8.0", JobIDRaw="8.0", TRESUsageInAve="cpu=1,mem=1M"),
        ]
    ).runs
    assert runs[0].gpu_used_s == D("0.5") * 2 * 3600
    assert runs[1].gpu_used_s is None


def test_steps_of_a_requeued_run_go_to_that_run() -> None:
    later = {"Submit": str(E0 + 4000), "Start": str(E0 + 4000), "End": str(E0 + 7600)}
    runs = read(
        [
            row("7", TotalCPU="00:05.000"),
            row("7.batch", TotalCPU="00:05.000", MaxRSS="10M"),
            row("7", **later),
            row("7.batch", TotalCPU="00:09.000", MaxRSS="20M", **later),
        ]
    ).runs
    assert [(r.cpu_used_s, r.mem_used_mb) for r in runs] == [(D(5), D(10)), (D(9), D(20))]


def test_hostile_job_names_and_damaged_records_are_counted_not_fatal() -> None:
    delimiter = sacct.new_delimiter()
    good = live([row("7", JobName=f"evil{delimiter[:5]}\n7|x|y"), row("7.batch")], delimiter)
    damaged = delimiter.join(["box", "8", "8"]) + delimiter + "\n"  # 3 fields of 22
    data = good + damaged.encode() + live([row("9", JobIDRaw="9")], delimiter).split(b"\n", 1)[1]
    framed = live_rows(data, delimiter=delimiter, fields=FIELDS, source="test")
    usage = runs_from_rows(framed, cluster="box", tz=timezone.utc)
    assert [r.record.job_id for r in usage.runs] == ["7", "9"]
    assert usage.runs[0].record.job_name.startswith("evil")
    assert len(usage.rejected) == 1 and "fields" in usage.rejected[0].reason


def test_a_corrupt_allocation_record_is_rejected_and_its_steps_are_orphans() -> None:
    usage = read([row("7", ElapsedRaw="-5"), row("7.batch"), row("8", JobIDRaw="8")])
    assert [r.record.job_id for r in usage.runs] == ["8"]
    assert len(usage.rejected) == 1
    assert usage.orphan_steps == 1


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("n1", ("n1",)),
        ("node[01-03,07]", ("node01", "node02", "node03", "node07")),
        ("a[1-2],gpu5", ("a1", "a2", "gpu5")),
        ("r[1-2]n[1-2]", ("r1n1", "r1n2", "r2n1", "r2n2")),
        ("None assigned", ("None assigned",)),
        ("", ()),
        ("None", ()),
        ("bad[x-y]", ("bad[x-y]",)),
    ],
)
def test_hostlists(text: str, names: tuple[str, ...]) -> None:
    assert expand_hostlist(text) == names


def test_hostlist_expansion_is_bounded() -> None:
    assert len(expand_hostlist("n[0-99999999]", limit=1000)) == 1000


def test_report_command_reads_steps_with_the_billing_readers_safety() -> None:
    delimiter = sacct.new_delimiter()
    fields = sacct.report_fields(False)
    argv = sacct.build_report_command(
        "sacct", T0, T0, delimiter=delimiter, fields=fields, clusters=("box",)
    )
    assert "--allocations" not in argv
    assert "--duplicates" in argv and f"--delimiter={delimiter}" in argv
    assert "JobName" not in fields and sacct.report_fields(True)[-1] == "JobName"
    with pytest.raises(ValueError, match="last"):
        sacct.build_report_command(
            "sacct", T0, T0, delimiter=delimiter, fields=("JobName", "JobID")
        )


def test_live_reading_in_chunks_keeps_each_run_once(tmp_path: Path) -> None:
    """A fake sacct prints one run spanning both chunks; it is kept once."""
    script = tmp_path / "sacct"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/calls\n'
        'for a in "$@"; do case "$a" in --delimiter=*) d="${a#--delimiter=}";; '
        '--format=*) f="${a#--format=}";; esac; done\n'
        'printf "%s" "$f" | sed "s/,/$d/g"; printf "%s\\n" "$d"\n'
        f"printf 'box{{d}}7{{d}}7{{d}}physics{{d}}compute{{d}}alice{{d}}{E0}{{d}}{E0}"
        f"{{d}}{E0 + 90000}"
        "{d}90000{d}COMPLETED{d}cpu=1,node=1{d}{d}{d}1{d}n1{d}{d}00:10.000{d}{d}{d}{d}{d}\\n'"
        ' | sed "s/{d}/$d/g"\n'
    )
    script.chmod(0o755)
    cfg = config_from_text(
        f"cluster: box\nsacct: {{path: {script}, backfill_pause: 0s}}\n"
        "accounts: {default: a}\npartitions: {default: CPU_HOUR}\n",
        "t.yaml",
        base_dir=tmp_path,
    )
    seen: list[int] = []
    usage = read_usage(
        cfg,
        T0,
        datetime.fromtimestamp(E0 + 2 * 86400, timezone.utc),
        sacct_file=None,
        stdin=None,  # type: ignore[arg-type]
        environ={"PATH": "/usr/bin:/bin", "PW_API_KEY": "secret"},
        with_job_name=False,
        progress=lambda n, total, w: seen.append(n),
        sleep=lambda s: None,
    )
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines()]
    assert len(calls) == 2 == len(seen)
    assert all("--allocations" not in c for c in calls)
    assert [(r.record.job_id, r.cpu_used_s) for r in usage.runs] == [("7", D(10))]


def test_a_wrapper_answering_something_else_is_a_temporary_failure(tmp_path: Path) -> None:
    script = tmp_path / "sacct"
    script.write_text("#!/bin/sh\necho 'JobID|State|'\n")
    script.chmod(0o755)
    cfg = config_from_text(
        f"cluster: box\nsacct: {{path: {script}}}\naccounts: {{default: a}}\n"
        "partitions: {default: CPU_HOUR}\n",
        "t.yaml",
        base_dir=tmp_path,
    )
    with pytest.raises(SacctUnavailable):
        read_usage(
            cfg, T0, T0.replace(hour=13), sacct_file=None, stdin=None,  # type: ignore[arg-type]
            environ={"PATH": "/usr/bin:/bin"}, with_job_name=False,
        )  # fmt: skip


def test_a_real_capture_with_steps(public_fixtures: Path) -> None:
    """Compute Canada's cedar, --format=ALL with steps: TotalCPU of the .batch and .extern
    steps, the batch step's MaxRSS, ReqMem per CPU."""
    data = (public_fixtures / "tdhock_cedar_2019-12_allcols_tab-delimited.txt").read_bytes()
    usage = read_saved_usage(data, CONFIG, source="cedar")
    (run,) = usage.runs
    assert run.steps == 2
    assert run.cpu_used_s == D("1309.123")  # 21:49.122 + 00:00.001
    assert run.mem_used_mb == D(1828196) / 1024
    assert run.mem_requested_mb == D(7996)
    assert run.nodes == ("cdr735",)
    assert usage.rejected == ()


def test_sacct_json_steps() -> None:
    job = {
        "job_id": 5,
        "cluster": "box",
        "account": "physics",
        "partition": "compute",
        "user": "alice",
        "nodes": "n[1-2]",
        "state": {"current": ["COMPLETED"]},
        "time": {"submission": E0 - 5, "start": E0, "end": E0 + 100, "elapsed": 100},
        "tres": {"allocated": [{"type": "cpu", "name": "", "count": 2}]},
        "steps": [
            {
                "time": {"total": {"seconds": 50, "microseconds": 250000}},
                "tasks": {"count": 2},
                "tres": {
                    "requested": {
                        "max": [{"type": "mem", "count": 3 * 1024 * 1024}],
                        "average": [{"type": "mem", "count": 2 * 1024 * 1024}],
                    }
                },
            },
            {"time": {"total": {"seconds": 1, "microseconds": 0}}, "tasks": {"count": 1}},
        ],
    }
    usage = read_saved_usage(json.dumps({"jobs": [job]}).encode(), CONFIG, source="json")
    (run,) = usage.runs
    assert run.cpu_used_s == D("51.25")
    assert run.mem_used_mb == D(4)  # 2 tasks x 2 MiB average
    assert run.nodes == ("n1", "n2")


def test_a_real_sacct_json_file_reads(public_fixtures: Path) -> None:
    data = (public_fixtures / "slurmweb_25.11.0_v0.0.44_slurmdb-job-completed.json").read_bytes()
    usage = read_saved_usage(data, CONFIG, source="slurmweb")
    assert usage.runs and usage.runs[0].steps >= 1
    assert usage.runs[0].cpu_used_s is not None
