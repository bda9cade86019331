"""models.Tres: a run's allocated TRES by billing metric (billing_metrics), read as before.

The amounts are kept by metric name, so that a metric added to the table needs nothing here;
the built-in metrics' attributes (``tres.cpu``, ``tres.mem_mb``...) and keywords stay, and
every count is the same Decimal as when they were the fields of a dataclass."""

from __future__ import annotations

import copy
import pickle
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_tracker.models import MIB_PER_GB, Tres

_COUNTS = st.integers(min_value=0, max_value=4294967293)
#: memory as the readers make it: MiB, whole or with a fraction (K, decimals like 62.50G)
_MIB = st.one_of(
    st.integers(0, 10**12).map(Decimal),
    st.decimals(min_value=0, max_value=10**15, places=10, allow_nan=False),
)


@given(_COUNTS, _MIB, _COUNTS, _COUNTS, _COUNTS)
def test_counts_are_the_decimals_the_fields_gave(
    cpu: int, mem_mb: Decimal, node: int, gpu: int, billing: int
) -> None:
    tres = Tres(cpu=cpu, mem_mb=mem_mb, node=node, gpu=gpu, billing=billing)
    assert (tres.cpu, tres.mem_mb, tres.node, tres.gpu, tres.billing) == (
        cpu,
        mem_mb,
        node,
        gpu,
        billing,
    )
    for metric, value in (("cpu", cpu), ("node", node), ("gpu", gpu), ("billing", billing)):
        count = tres.count(metric)
        assert count == Decimal(value) and str(count) == str(Decimal(value))
    old_memory = mem_mb / MIB_PER_GB  # what Tres.count("mem") computed
    assert tres.count("mem") == old_memory
    assert str(tres.count("mem")) == str(old_memory)  # the same digits and exponent
    assert tres.amount("mem") is mem_mb


def test_a_metric_not_given_is_zero_of_its_kind() -> None:
    empty = Tres()
    assert (empty.cpu, empty.node, empty.gpu, empty.billing) == (0, 0, 0, 0)
    assert isinstance(empty.cpu, int) and isinstance(empty.mem_mb, Decimal)
    assert str(empty.mem_mb) == "0" and str(empty.count("mem")) == "0"
    assert isinstance(empty.amount("mem"), Decimal) and empty.amount("cpu") == 0
    assert empty.count("gpu") == Decimal(0)


def test_equal_by_value_whatever_was_spelt_out() -> None:
    assert Tres(cpu=2) == Tres(cpu=2, gpu=0, mem_mb=Decimal("0.0"))
    assert Tres(cpu=2) != Tres(cpu=3) and Tres(gpu=1) != Tres()
    assert Tres(mem_mb=Decimal(1024)) == Tres.of({"mem": Decimal(1024)})
    assert hash(Tres(cpu=2)) == hash(Tres(cpu=2, gpu=0, mem_mb=Decimal(0)))
    assert len({Tres(cpu=2), Tres(cpu=2, node=0), Tres(cpu=3)}) == 2
    assert Tres(cpu=1) != "cpu=1"


def test_immutable_copyable_and_shown_with_its_fields() -> None:
    tres = Tres(cpu=4, mem_mb=Decimal(4096))
    with pytest.raises(AttributeError):
        tres.cpu = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        tres._amounts = {}
    assert pickle.loads(pickle.dumps(tres)) == tres
    assert copy.deepcopy(tres) == tres and copy.copy(tres) == tres
    assert repr(tres) == "Tres(cpu=4, mem_mb=Decimal('4096'))"


def test_unknown_keywords_and_metrics_are_refused() -> None:
    with pytest.raises(TypeError, match="cpus"):
        Tres(cpus=4)
    with pytest.raises(TypeError, match="'mem'"):
        Tres(mem=4)  # memory's keyword is its field, mem_mb (MiB)
    with pytest.raises(KeyError):
        Tres(cpu=1).count("tpu")
