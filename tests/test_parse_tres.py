"""parse_tres.py: one TRES decoder for the parsable text (AllocTRES) and the JSON list
(tres.allocated): both forms of the same allocation decode equal, the GPU rule included."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from typing import Any, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_tracker import parse, sacct, sacct_format
from slurm_tracker import parse_tres as tres_module
from slurm_tracker.models import Tres
from slurm_tracker.parse import parse_sacct, parse_tres, tres_from_json

#: One allocated TRES as the JSON lists it: (type, name, count).
Entry = tuple[str, str, int]

_GPU_TYPES = st.sampled_from(["a100", "h100", "v100", "rtx_6000", "mi250x", "a100_80"])
_COUNT = st.integers(min_value=0, max_value=100_000)
#: TRES that are not billed: in both forms, whatever their value.
_IGNORED: list[Entry] = [
    ("energy", "", 123456),
    ("fs", "disk", 1048576),
    ("license", "matlab", 2),
    ("gres", "gpumem", 40960),
    ("gres", "gpuutil", 50),
    ("bb", "datawarp", 1024),
]


@st.composite
def allocations(draw: st.DrawFn) -> tuple[list[Entry], Tres]:
    """The entries of one allocation, in any order, and the Tres they mean."""
    entries: list[Entry] = []
    scalars: dict[str, int] = {}
    for kind in ("cpu", "node", "billing", "mem"):
        count = draw(st.one_of(st.none(), _COUNT if kind != "mem" else st.integers(0, 10**8)))
        if count is not None:
            entries.append((kind, "", count))
            scalars[kind] = count
    typed = draw(st.dictionaries(_GPU_TYPES, st.integers(0, 64), max_size=3))
    entries += [("gres", f"gpu:{name}", count) for name, count in typed.items()]
    # Slurm lists a typed allocation under both names; the untyped count is the one that counts
    untyped: Optional[int] = draw(st.one_of(st.none(), st.just(sum(typed.values())), _COUNT))
    if untyped is not None:
        entries.append(("gres", "gpu", untyped))
    entries += draw(st.lists(st.sampled_from(_IGNORED), max_size=3, unique=True))
    expected = Tres(
        cpu=scalars.get("cpu", 0),
        mem_mb=Decimal(scalars.get("mem", 0)),
        node=scalars.get("node", 0),
        gpu=untyped if untyped is not None else sum(typed.values()),
        billing=scalars.get("billing", 0),
    )
    return draw(st.permutations(entries)), expected


def as_text(entries: list[Entry], draw_unit: st.DataObject) -> str:
    """AllocTRES as sacct prints it: ``type/name=count``, memory with a unit."""
    items = []
    for kind, name, count in entries:
        value = str(count)
        if kind == "mem":
            giga = count % 1024 == 0 and draw_unit.draw(st.booleans())
            value = f"{count // 1024}G" if giga else f"{count}M"
        items.append(f"{kind}/{name}={value}" if name else f"{kind}={value}")
    return ",".join(items)


def as_json(entries: list[Entry], draw_shape: st.DataObject) -> list[dict[str, Any]]:
    """tres.allocated as sacct --json prints it (the name empty or null for the plain types;
    a count plain or as a ``{set, infinite, number}`` object)."""
    listed = []
    for index, (kind, name, count) in enumerate(entries, start=1):
        shown: Any = count
        if draw_shape.draw(st.booleans()):
            shown = {"set": True, "infinite": False, "number": count}
        no_name = draw_shape.draw(st.sampled_from(["", None]))
        listed.append({"type": kind, "name": name or no_name, "id": index, "count": shown})
    return listed


@given(allocations(), st.data())
def test_the_text_and_json_forms_of_one_allocation_decode_equal(
    allocation: tuple[list[Entry], Tres], data: st.DataObject
) -> None:
    entries, expected = allocation
    text, listed = as_text(entries, data), as_json(entries, data)
    assert parse_tres(text) == expected
    assert tres_from_json(listed) == expected


@pytest.mark.parametrize(
    ("entries", "gpus"),
    [
        ([("gres", "gpu:a100", 4), ("gres", "gpu", 4)], 4),  # both names: not added up
        ([("gres", "gpu", 1), ("gres", "gpu:a100", 1)], 1),  # in any order
        ([("gres", "gpu:a100", 2), ("gres", "gpu:v100", 1)], 3),  # typed only: summed
        ([("gres", "gpu:a100", 2), ("gres", "gpu", 0)], 0),  # the untyped count wins
        ([("gres", "gpumem", 40), ("gres", "gpuutil", 9)], 0),  # not GPUs
    ],
)
def test_both_readers_apply_one_gpu_rule(entries: list[Entry], gpus: int) -> None:
    text = ",".join(f"{kind}/{name}={count}" for kind, name, count in entries)
    listed = [{"type": kind, "name": name, "count": count} for kind, name, count in entries]
    assert parse_tres(text).gpu == gpus
    assert tres_from_json(listed).gpu == gpus


def test_a_whole_json_record_and_a_whole_text_record_get_the_same_tres() -> None:
    tres = "billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1"
    text = (
        "JobIDRaw|Submit|Start|End|ElapsedRaw|AllocTRES\n"
        f"7|2026-03-01T00:00:00|2026-03-01T00:00:00|2026-03-01T01:00:00|3600|{tres}\n"
    ).encode()
    allocated = [
        {"type": "billing", "name": "", "id": 5, "count": 78},
        {"type": "cpu", "name": "", "id": 1, "count": 48},
        {"type": "gres", "name": "gpu:a100", "id": 1002, "count": 4},
        {"type": "gres", "name": "gpu", "id": 1001, "count": 4},
        {"type": "mem", "name": "", "id": 2, "count": 393216},
        {"type": "node", "name": "", "id": 4, "count": 1},
    ]
    job = {
        "job_id": 7,
        "time": {
            "submission": 1772323200,
            "start": 1772323200,
            "end": 1772326800,
            "elapsed": 3600,
        },
        "tres": {"allocated": allocated},
    }
    document = json.dumps({"jobs": [job]}).encode()
    (from_text,) = parse_sacct(text, cluster="c").records
    (from_json,) = parse_sacct(document, cluster="c").records
    expected = Tres(cpu=48, mem_mb=Decimal(393216), node=1, gpu=4, billing=78)
    assert from_text.tres == from_json.tres == expected


def test_json_counts_that_are_not_set_are_skipped_not_counted() -> None:
    listed = [
        {"type": "cpu", "count": 4},
        {"type": "gres", "name": "gpu", "count": {"set": False, "infinite": False, "number": 0}},
        {"type": "gres", "name": "gpu:a100", "count": 2},
        {"type": "energy", "count": -2},
        {"type": "mem", "count": 0xFFFFFFFE},
    ]
    assert tres_from_json(listed) == Tres(cpu=4, gpu=2)


# --- the layout: the reader's modules ---------------------------------------------------------


def test_the_reader_does_not_import_the_subprocess_runner() -> None:
    code = (
        "import sys, slurm_tracker.parse; "
        "print(sorted(m for m in sys.modules if m.startswith('slurm_tracker.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "slurm_tracker.parse_tres" in loaded
    assert "'slurm_tracker.sacct'" not in loaded


def test_sacct_and_parse_re_export_the_same_objects() -> None:
    for name in ("CAPTURE_DELIMITER", "LIVE_FIELDS", "REPORT_FIELDS", "live_fields"):
        assert getattr(sacct, name) is getattr(sacct_format, name)
    assert sacct.new_delimiter is sacct_format.new_delimiter
    assert parse.canonical_field is sacct_format.canonical_field
    assert parse.parse_tres is tres_module.parse_tres
    for name in parse.__all__:
        assert hasattr(parse, name), name
    for name in sacct.__all__:
        assert hasattr(sacct, name), name
