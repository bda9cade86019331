"""Every public sacct capture in ../shared/fixtures/sacct/public is read (see its MANIFEST.md).

Numbers asserted below were read from the files themselves.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from slurm_tracker.errors import InputError
from slurm_tracker.models import JobRecord, ParseResult, Tres
from slurm_tracker.parse import parse_duration, parse_job_id, parse_sacct, parse_state

UTC = timezone.utc
#: sonar's own tests read its captures with TZ=CET-2, i.e. a fixed UTC+2 (MANIFEST.md).
SONAR_TZ = timezone(timedelta(hours=2), "CET-2")
#: cedar (Vancouver) in December: PST.
CEDAR_TZ = timezone(timedelta(hours=-8), "PST")

#: Field lists of the --noheader captures, from MANIFEST.md.
SONAR_FIELDS = (
    "JobID",
    "JobIDRaw",
    "User",
    "Account",
    "State",
    "Start",
    "End",
    "AveCPU",
    "AveDiskRead",
    "AveDiskWrite",
    "AveRSS",
    "AveVMSize",
    "ElapsedRaw",
    "ExitCode",
    "Layout",
    "MaxRSS",
    "MaxVMSize",
    "MinCPU",
    "ReqCPUS",
    "ReqMem",
    "ReqNodes",
    "Reservation",
    "Submit",
    "Suspended",
    "SystemCPU",
    "TimelimitRaw",
    "UserCPU",
    "NodeList",
    "Partition",
    "AllocTRES",
    "Priority",
    "JobName",
)
XDMOD_FIELDS = (
    "jobid",
    "jobidraw",
    "cluster",
    "partition",
    "qos",
    "account",
    "group",
    "gid",
    "user",
    "uid",
    "submit",
    "eligible",
    "start",
    "end",
    "elapsed",
    "exitcode",
    "state",
    "nnodes",
    "ncpus",
    "reqcpus",
    "reqmem",
    "reqtres",
    "alloctres",
    "timelimit",
    "nodelist",
    "jobname",
)

#: The 5-field captures (JobID|ExitCode|State|MaxRSS|Elapsed) cannot be billed.
FIVE_FIELD_FILES = (
    "tdhock_2019-12_array-running-and-pending_parsable2.txt",
    "tdhock_2019-12_multiuser-long-elapsed_parsable2.txt",
)

#: records, rejected, steps ignored
EXPECTED_COUNTS = {
    "clockwork_cedar_21.08.8_dbv0.0.37_sacct-X.json": (2, 0, 0),
    "slurmweb_23.11.10_v0.0.40_slurmdb-job-timeout.json": (1, 0, 1),
    "slurmweb_24.05.3_v0.0.41_slurmdb-job-running.json": (1, 0, 1),
    "slurmweb_24.11.5_v0.0.42_slurmdb-job-pending.json": (1, 0, 0),
    "slurmweb_25.05.4_v0.0.43_slurmdb-job-archived.json": (1, 0, 1),
    "slurmweb_25.11.0_v0.0.44_slurmdb-job-completed.json": (1, 0, 1),
    "sonar_fox_2024-11_parsable2-noheader_32fields.txt": (29, 0, 67),
    "sonar_fox_2025-09_parsable2-noheader_32fields.txt": (122, 0, 179),
    "tdhock_cedar_2019-12_allcols_tab-delimited.txt": (1, 0, 2),
    "xdmod_ubccr_2015-2016_parsable2-noheader_26fields.log": (4, 0, 0),
}


def _options(name: str) -> dict[str, Any]:
    if name.startswith("sonar_"):
        return {"fields": SONAR_FIELDS, "tz": SONAR_TZ}
    if name.startswith("xdmod_"):
        return {"fields": XDMOD_FIELDS}
    if name.startswith("tdhock_cedar_"):
        return {"tz": CEDAR_TZ}
    return {}


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".md")


def _read(folder: Path, name: str) -> ParseResult:
    path = folder / name
    return parse_sacct(path.read_bytes(), cluster="fixture", source=name, **_options(name))


def _by_id(result: ParseResult) -> dict[str, JobRecord]:
    return {record.job_id: record for record in result.records}


def test_every_fixture_file_is_read(public_fixtures: Path) -> None:
    files = _data_files(public_fixtures)
    assert {p.name for p in files} >= set(EXPECTED_COUNTS) | set(FIVE_FIELD_FILES)
    for path in files:
        if path.name in FIVE_FIELD_FILES:
            continue  # see test_five_field_files_cannot_be_billed
        result = _read(public_fixtures, path.name)
        counts = (len(result.records), len(result.rejected), result.steps_ignored)
        assert result.rejected == (), path.name
        assert result.records, path.name
        if path.name in EXPECTED_COUNTS:
            assert counts == EXPECTED_COUNTS[path.name], path.name
        for record in result.records:
            assert record.submit_at.utcoffset() == timedelta(0), (path.name, record.job_id)
            assert record.job_id_raw, path.name
            assert "." not in record.job_id, path.name
            assert record.elapsed_s >= 0, path.name
            if record.start_at is None:
                assert record.elapsed_s == 0, (path.name, record.job_id)


@pytest.mark.parametrize("name", FIVE_FIELD_FILES)
def test_five_field_files_cannot_be_billed(public_fixtures: Path, name: str) -> None:
    with pytest.raises(InputError) as caught:
        _read(public_fixtures, name)
    message = str(caught.value)
    assert message.startswith(f"{name}: the sacct output lacks the column(s) ")
    assert "Submit, Start, End, AllocTRES (or AllocCPUS/NCPUS)" in message
    assert "--format=Cluster,JobID,JobIDRaw," in message


@pytest.mark.parametrize(
    ("name", "rows", "allocations", "steps", "pending_arrays", "max_elapsed_s"),
    [
        (FIVE_FIELD_FILES[0], 226, 75, 150, 1, 405),
        (FIVE_FIELD_FILES[1], 572, 446, 124, 2, 40 * 86400 + 3 * 3600 + 35 * 60 + 56),
    ],
)
def test_five_field_files_values_parse(
    public_fixtures: Path,
    name: str,
    rows: int,
    allocations: int,
    steps: int,
    pending_arrays: int,
    max_elapsed_s: int,
) -> None:
    header, *lines = (public_fixtures / name).read_text().splitlines()
    assert header == "JobID|ExitCode|State|MaxRSS|Elapsed"
    assert len(lines) == rows
    kinds: Counter[str] = Counter()
    longest = 0
    for line in lines:
        job_id, _exit_code, state, _max_rss, elapsed = line.split("|")
        parsed = parse_job_id(job_id)
        kinds["step" if parsed.is_step else "pending" if parsed.is_pending_array else "job"] += 1
        assert parse_state(state) in {"RUNNING", "PENDING"}
        seconds = parse_duration(elapsed)
        assert seconds is not None
        longest = max(longest, seconds)
    assert kinds == {"job": allocations, "step": steps, "pending": pending_arrays}
    assert longest == max_elapsed_s


def test_five_field_pending_array_and_two_digit_days(public_fixtures: Path) -> None:
    array_file = (public_fixtures / FIVE_FIELD_FILES[0]).read_text().splitlines()
    meta = parse_job_id(array_file[-1].split("|")[0])
    assert (meta.base, meta.array_spec, meta.is_pending_array) == (26735347, "76-999", True)
    multiuser = (public_fixtures / FIVE_FIELD_FILES[1]).read_text().splitlines()
    assert multiuser[86] == "30145877|0:0|RUNNING||40-02:15:42"
    assert parse_duration("40-02:15:42") == 3464142
    assert parse_job_id(multiuser[215].split("|")[0]).array_spec == "1"  # 30166062_[1]


def test_clockwork_requeued_and_node_fail_gpu_array_tasks(public_fixtures: Path) -> None:
    jobs = _by_id(_read(public_fixtures, "clockwork_cedar_21.08.8_dbv0.0.37_sacct-X.json"))
    node_fail, requeued = jobs["63752790_7"], jobs["63692861_0"]
    assert (node_fail.job_id_raw, node_fail.state, node_fail.elapsed_s) == (
        "63768795",
        "NODE_FAIL",
        20615,
    )
    assert (requeued.job_id_raw, requeued.state, requeued.elapsed_s) == (
        "63694682",
        "REQUEUED",
        86307,
    )
    for record in (node_fail, requeued):
        assert record.tres == Tres(cpu=4, mem_mb=Decimal(40960), node=1, gpu=1, billing=1)
        assert (record.cluster, record.partition) == ("cedar", "gpubase_bygpu_b3")
        assert record.account == "rrg-cerise-ad_gpu"
    assert requeued.user == "nobody2"
    assert requeued.submit_at == datetime(2023, 3, 29, 22, 13, 10, tzinfo=UTC)  # 1680127990
    assert requeued.end_at == datetime(2023, 3, 30, 22, 39, 41, tzinfo=UTC)  # 1680215981
    assert requeued.final
    assert requeued.extra["Reservation"] == ""  # reservation.name 0 (an int) means none
    assert requeued.line == 2


def test_slurmweb_timeout(public_fixtures: Path) -> None:
    result = _read(public_fixtures, "slurmweb_23.11.10_v0.0.40_slurmdb-job-timeout.json")
    (job,) = result.records
    assert (job.job_id, job.state, job.elapsed_s) == ("609", "TIMEOUT", 79)
    assert job.tres == Tres(cpu=1, mem_mb=Decimal(512), node=1, billing=1)  # energy -2 ignored
    assert job.end_at == datetime.fromtimestamp(1746624340, UTC)
    assert result.steps_ignored == 1  # 609.batch


def test_slurmweb_running_job_may_still_grow(public_fixtures: Path) -> None:
    (job,) = _read(public_fixtures, "slurmweb_24.05.3_v0.0.41_slurmdb-job-running.json").records
    assert (job.job_id, job.state, job.elapsed_s) == ("649722", "RUNNING", 88)
    assert job.start_at == datetime.fromtimestamp(1747754478, UTC)
    assert job.end_at is None
    assert not job.final


def test_slurmweb_pending_job(public_fixtures: Path) -> None:
    (job,) = _read(public_fixtures, "slurmweb_24.11.5_v0.0.42_slurmdb-job-pending.json").records
    assert (job.job_id, job.state) == ("6370", "PENDING")
    assert (job.start_at, job.end_at, job.elapsed_s) == (None, None, 0)
    assert job.tres == Tres()
    assert job.submit_at == datetime.fromtimestamp(1762788785, UTC)


def test_slurmweb_25_05_completed_2_cpus_1024_mb_360_s(public_fixtures: Path) -> None:
    (job,) = _read(public_fixtures, "slurmweb_25.05.4_v0.0.43_slurmdb-job-archived.json").records
    assert (job.job_id, job.state, job.elapsed_s) == ("2194", "COMPLETED", 360)
    assert job.tres == Tres(cpu=2, mem_mb=Decimal(1024), node=2, billing=2)
    # association.account/user are empty here: the top-level fields are used.
    assert (job.account, job.user, job.partition, job.cluster) == ("admin", "jwilson", "gpu", "hpc")


def test_slurmweb_25_11_completed_4_cpus_30_s(public_fixtures: Path) -> None:
    (job,) = _read(public_fixtures, "slurmweb_25.11.0_v0.0.44_slurmdb-job-completed.json").records
    assert (job.job_id, job.state, job.elapsed_s) == ("5749", "COMPLETED", 30)
    assert job.tres == Tres(cpu=4, mem_mb=Decimal(2048), node=1, billing=4)
    assert job.end_at == datetime.fromtimestamp(1762942505, UTC)


def test_sonar_2025_09(public_fixtures: Path) -> None:
    result = _read(public_fixtures, "sonar_fox_2025-09_parsable2-noheader_32fields.txt")
    jobs = _by_id(result)
    assert Counter(r.state for r in result.records) == {
        "COMPLETED": 49,
        "RUNNING": 32,
        "PENDING": 31,
        "CANCELLED": 5,
        "TIMEOUT": 3,
        "FAILED": 2,
    }
    assert sum(r.end_at is None for r in result.records) == 63  # RUNNING + PENDING

    running = jobs["1879824"]  # gres/gpu:a100=1,gres/gpu=1
    assert (running.state, running.end_at, running.elapsed_s) == ("RUNNING", None, 1192379)
    assert running.start_at == datetime(2025, 9, 12, 12, 6, 12, tzinfo=UTC)  # 14:06:12 at +2
    assert running.tres == Tres(cpu=32, mem_mb=Decimal(131072), node=1, gpu=1, billing=32)
    assert (running.cluster, running.line) == ("fixture", 1)

    four_gpus = jobs["1902893"]  # gres/gpu:a100_80=4,gres/gpu=4
    assert four_gpus.tres == Tres(cpu=48, mem_mb=Decimal(393216), node=1, gpu=4, billing=78)

    pending = jobs["1903070"]
    assert (pending.state, pending.start_at, pending.end_at) == ("PENDING", None, None)
    assert (pending.elapsed_s, pending.tres, pending.line) == (0, Tres(), 7)
    assert pending.extra["NodeList"] == "None assigned"

    timeout = jobs["1955319"]
    assert (timeout.state, timeout.elapsed_s, timeout.tres.gpu) == ("TIMEOUT", 82811, 1)
    assert timeout.job_name == "OOD Code Server"

    cancelled = jobs["1956890"]  # "CANCELLED by 2101037", Start "None": never started
    assert (cancelled.state, cancelled.start_at, cancelled.elapsed_s) == ("CANCELLED", None, 0)
    assert cancelled.end_at == datetime(2025, 9, 26, 6, 2, 35, tzinfo=UTC)


def test_sonar_2024_11_cancelled_typed_gpu(public_fixtures: Path) -> None:
    result = _read(public_fixtures, "sonar_fox_2024-11_parsable2-noheader_32fields.txt")
    job = _by_id(result)["974745"]  # CANCELLED by 2101477; gres/gpu:rtx30=1,gres/gpu=1
    assert (job.state, job.elapsed_s, job.line) == ("CANCELLED", 1389, 68)
    assert job.tres == Tres(cpu=20, mem_mb=Decimal(51200), node=1, gpu=1, billing=20)
    assert job.extra["SystemCPU"] == "08:15.063"


def test_xdmod(public_fixtures: Path) -> None:
    jobs = _by_id(_read(public_fixtures, "xdmod_ubccr_2015-2016_parsable2-noheader_26fields.log"))
    timeout = jobs["4103947"]
    assert (timeout.state, timeout.elapsed_s, timeout.cluster) == ("TIMEOUT", 259200, "ub-hpc")
    assert timeout.tres == Tres(cpu=256, mem_mb=Decimal(3000), node=32, billing=256)
    assert timeout.submit_at == datetime(2015, 6, 26, 13, 57, tzinfo=UTC)  # made with TZ=UTC
    cancelled = jobs["4107166"]  # CANCELLED by 102216, elapsed 2-22:03:04
    assert (cancelled.state, cancelled.elapsed_s) == ("CANCELLED", 252184)
    odd = jobs["5692623"]  # empty partition, Eligible=Unknown, zero CPUs
    assert (odd.partition, odd.tres, odd.extra["Eligible"]) == ("", Tres(gpu=2), "Unknown")


def test_tdhock_cedar_all_columns_tab_delimited(public_fixtures: Path) -> None:
    result = _read(public_fixtures, "tdhock_cedar_2019-12_allcols_tab-delimited.txt")
    (job,) = result.records
    assert (job.job_id, job.state, job.elapsed_s, job.cluster) == (
        "32650736",
        "TIMEOUT",
        3606,
        "cedar",
    )
    assert job.submit_at == datetime(2019, 12, 12, 4, 35, 17, tzinfo=UTC)  # 20:35:17 PST
    assert job.tres == Tres(cpu=1, mem_mb=Decimal(7996), node=1, billing=1)
    assert (job.account, job.user) == ("rpp-kenclark_cpu", "icecube10")
    assert job.extra["ReqMem"] == "7996Mc"
    assert len(job.extra) == 108 - 13  # every other column, by its sacct name
    assert result.steps_ignored == 2  # .batch and .extern
