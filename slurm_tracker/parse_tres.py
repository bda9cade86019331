"""Allocated TRES (part of the reader, :mod:`slurm_tracker.parse`): ONE decoder, fed by the
parsable text (``AllocTRES``: ``billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1``)
and by the JSON list (``tres.allocated``: ``[{"type": "gres", "name": "gpu:a100", "count": 4},
...]``), so that both agree on what counts, above all on GPUs.

Each form has its own front end, which reads its syntax (and its memory unit) into
``(name, count)`` pairs, names as AllocTRES spells them (the JSON type ``gres`` with the name
``gpu:a100`` is ``gres/gpu:a100``), and the memory in MiB; :func:`decode_tres` decides what the
counts mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from functools import lru_cache
from typing import Any, Optional

from .models import Tres
from .parse_fields import _NO_VAL, _Bad, _count, _jint, _json_snippet, _jstr

_TRES_ITEM_RE = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_/:.\-]*)=(?P<value>.*)")
_MEM_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTPkmgtp]?)")
_MIB_PER_UNIT = {
    "K": Decimal(1) / Decimal(1024),
    "": Decimal(1),
    "M": Decimal(1),
    "G": Decimal(1024),
    "T": Decimal(1024) ** 2,
    "P": Decimal(1024) ** 3,
}
_COUNTS = frozenset({"cpu", "node", "billing", "gres/gpu"})
_TYPED_GPU = "gres/gpu:"


def counted(name: str) -> bool:
    """Whether the TRES ``name`` (lower-case, as AllocTRES spells it) is one
    :func:`decode_tres` counts; the values of the others are never read."""
    return name in _COUNTS or name.startswith(_TYPED_GPU)


def decode_tres(counts: Iterable[tuple[str, int]], mem_mb: Decimal = Decimal(0)) -> Tres:
    """The one TRES decoder: ``counts`` are (lower-case AllocTRES name, count) pairs of the
    :func:`counted` TRES that are set, ``mem_mb`` the memory in MiB (its unit depends on the
    form: each front end reads it).

    GPUs: the untyped ``gres/gpu`` count when present, else the sum of the typed
    ``gres/gpu:TYPE`` counts (never both: Slurm lists a typed allocation under both names).
    """
    cpu = node = billing = typed_gpus = 0
    untyped_gpus: Optional[int] = None
    for name, count in counts:
        if name == "cpu":
            cpu = count
        elif name == "node":
            node = count
        elif name == "billing":
            billing = count
        elif name == "gres/gpu":
            untyped_gpus = count
        elif name.startswith(_TYPED_GPU):
            typed_gpus += count
    gpu = untyped_gpus if untyped_gpus is not None else typed_gpus
    return Tres(cpu=cpu, mem_mb=mem_mb, node=node, gpu=gpu, billing=billing)


# --- parsable text (AllocTRES) ----------------------------------------------------------------


def parse_tres(text: str) -> Tres:
    """Allocated TRES from ``billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1``.

    Memory goes to MiB (``K`` = 1/1024 MiB). GPUs: the untyped ``gres/gpu`` count when present,
    else the sum of the typed ``gres/gpu:TYPE`` counts (never both). Other TRES are ignored.
    A malformed item raises ValueError.
    """
    return _parse_tres(text)


@lru_cache(maxsize=4096)  # allocations repeat: a few hundred shapes in a whole month
def _parse_tres(text: str) -> Tres:
    stripped = text.strip()
    if not stripped:
        return Tres()
    counts: list[tuple[str, int]] = []
    mem_mb = Decimal(0)
    seen: set[str] = set()
    for item in stripped.split(","):
        match = _TRES_ITEM_RE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"malformed TRES item {item!r} (expected name=value)")
        name, value = match.group("name").lower(), match.group("value").strip()
        if name in seen:
            raise ValueError(f"TRES {name} appears twice")
        seen.add(name)
        if name == "mem":
            mem = _MEM_RE.fullmatch(value)
            if mem is None:
                raise ValueError(f"mem={value!r} is not an amount of memory")
            mem_mb = Decimal(mem.group("num")) * _MIB_PER_UNIT[mem.group("unit").upper()]
        elif counted(name):
            counts.append((name, _count(name, value)))
    return decode_tres(counts, mem_mb)


# --- JSON (tres.allocated) ----------------------------------------------------------------------


def tres_from_json(allocated: Any) -> Tres:
    """Allocated TRES from sacct --json's ``tres.allocated`` list (None: no TRES). Memory
    counts are MB, as Slurm counts memory; a count that is not set (``NO_VAL``, negative) is
    skipped. A malformed list or item raises _Bad."""
    if allocated is None:
        return Tres()
    if not isinstance(allocated, list):
        raise _Bad(f"tres.allocated is {_json_snippet(allocated)}, not a list")
    counts: list[tuple[str, int]] = []
    mem_mb = Decimal(0)
    for item in allocated:
        if not isinstance(item, dict):
            raise _Bad(f"tres.allocated item {_json_snippet(item)} is not an object")
        kind = _jstr(item.get("type"), "tres type").lower()
        name = _jstr(item.get("name"), "tres name").lower()
        count = _jint(item.get("count"), f"tres {kind} count")
        if count is None or count < 0 or count >= _NO_VAL:
            continue  # NO_VAL (e.g. energy -2)
        if kind == "mem":
            mem_mb = Decimal(count)  # MB, as Slurm counts memory
        elif kind == "gres":  # the AllocTRES name: type/name, e.g. gres/gpu:a100
            counts.append((f"gres/{name}", count))
        elif "/" not in kind:  # a type is one word: "cpu", "node", "billing", "energy"...
            counts.append((kind, count))
    return decode_tres(counts, mem_mb)
