from __future__ import annotations

import pytest

from slurm_tracker.config import AccountMapping, PartitionMapping
from slurm_tracker.mapping import Target, map_record
from slurm_tracker.models import Skipped, SkuCharge
from tests.factories import record

CPU = SkuCharge("SLURM_CPU_HOUR", "cpu")
GPU = SkuCharge("SLURM_GPU_HOUR", "gpu")
ACCOUNTS = AccountMapping(
    exact={"physics": "physics-2026", "chem-special": "special"},
    patterns=(("chem*", "chemistry-2026"), ("c*", "c-anything")),
    ignore=("root", "test-*"),
)
PARTITIONS = PartitionMapping(
    exact={"compute": (CPU,), "gpu": (GPU, CPU)},
    patterns=(("big*", (CPU,)),),
    ignore=("debug",),
)


@pytest.mark.parametrize(
    ("account", "partition", "expected"),
    [
        ("physics", "compute", Target("physics-2026", (CPU,))),
        ("chem-special", "gpu", Target("special", (GPU, CPU))),  # exact beats pattern
        ("chemistry", "bigmem", Target("chemistry-2026", (CPU,))),  # first pattern wins
        ("cosmo", "compute", Target("c-anything", (CPU,))),
        ("root", "compute", "account 'root' is ignored"),
        ("test-x", "compute", "account 'test-x' is ignored"),
        ("biology", "compute", "account 'biology' maps to no allocation"),
        ("physics", "debug", "partition 'debug' is ignored"),
        ("physics", "weird", "partition 'weird' maps to no SKU"),
        # slurmdbd can briefly store an ended job without its partition: never bill it to a
        # default, wait for the complete record
        ("physics", "", "record has no partition"),
        ("", "compute", "record has no account"),
    ],
)
def test_map_record(account: str, partition: str, expected: object) -> None:
    result = map_record(record(account=account, partition=partition), ACCOUNTS, PARTITIONS)
    if isinstance(expected, Target):
        assert result == expected
    else:
        assert isinstance(result, Skipped)
        assert str(expected) in result.reason


def test_defaults_catch_the_rest_but_not_incomplete_records() -> None:
    accounts = AccountMapping(exact={"physics": "p"}, default="general")
    partitions = PartitionMapping(default=(CPU,))
    assert map_record(record(account="x", partition="y"), accounts, partitions) == Target(
        "general", (CPU,)
    )
    assert isinstance(map_record(record(partition=""), accounts, partitions), Skipped)
