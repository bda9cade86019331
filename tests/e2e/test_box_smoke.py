"""The box runs jobs and accounts CPUs, memory and GPUs; the truth helper reads them right."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.e2e import cluster


@pytest.mark.e2e
@pytest.mark.usefixtures("slurm_box")
def test_jobs_on_both_partitions_are_accounted_with_their_tres() -> None:
    cpu_job = cluster.submit(
        "-c", "2", "--mem=200M", account="chemistry", partition="compute", wrap="sleep 2"
    )
    gpu_job = cluster.submit(
        "--gres=gpu:2", "--mem=100M", account="physics", partition="gpu", wrap="sleep 2"
    )

    cluster.wait_all_done([cpu_job, gpu_job], timeout=180)
    runs = cluster.truth([cpu_job, gpu_job])

    by_job = {run.job_id: (key, run) for key, run in runs.items()}
    assert sorted(by_job) == sorted([cpu_job, gpu_job])
    (cluster_name, raw, submit), cpu_run = by_job[cpu_job]
    assert (cluster_name, raw) == ("box", cpu_job)
    assert submit > 1_600_000_000
    assert (cpu_run.account, cpu_run.partition, cpu_run.state) == (
        "chemistry",
        "compute",
        "COMPLETED",
    )
    assert (cpu_run.cpu, cpu_run.gpu, cpu_run.mem_mb, cpu_run.node) == (2, 0, Decimal(200), 1)
    assert cpu_run.final
    assert cpu_run.elapsed_s >= 1
    _, gpu_run = by_job[gpu_job]
    assert (gpu_run.account, gpu_run.partition, gpu_run.state) == ("physics", "gpu", "COMPLETED")
    assert (gpu_run.cpu, gpu_run.gpu, gpu_run.mem_mb, gpu_run.node) == (1, 2, Decimal(100), 1)
    assert gpu_run.final


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100M", Decimal(100)),
        ("1.50G", Decimal(1536)),
        ("2T", Decimal(2 * 1024 * 1024)),
        ("512K", Decimal("0.5")),
        ("64", Decimal(64)),
        ("", Decimal(0)),
    ],
)
def test_truth_memory_units(text: str, expected: Decimal) -> None:
    assert cluster.mem_mb(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("billing=1,cpu=1,gres/gpu:a100=2,gres/gpu=2,mem=100M,node=1", 2),
        ("cpu=4,gres/gpu:a100=1,gres/gpu:v100=2", 3),
        ("cpu=4,mem=1G,node=1", 0),
    ],
)
def test_truth_gpu_count_never_adds_typed_and_untyped(text: str, expected: int) -> None:
    assert cluster.gpu_count(cluster.parse_tres(text)) == expected
