"""Allocated TRES (part of the reader, :mod:`slurm_tracker.parse`): ONE decoder, fed by the
parsable text (``AllocTRES``: ``billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1``)
and by the JSON list (``tres.allocated``: ``[{"type": "gres", "name": "gpu:a100", "count": 4},
...]``), so that both agree on what counts, above all on GPUs.

What is read, and how, is the table of billing metrics (:mod:`slurm_tracker.billing_metrics`):
each metric names the AllocTRES name it reads, whether it is a count or an amount of memory,
and whether typed GRES variants count. Each form has its own front end, which reads its syntax
(and its memory unit) into ``(name, amount)`` pairs of the TRES some metric reads, names as
AllocTRES spells them (the JSON type ``gres`` with the name ``gpu:a100`` is
``gres/gpu:a100``), memory in MiB; :func:`decode_tres` decides what the amounts mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal
from functools import lru_cache
from typing import Any

from .billing_metrics import Amount, MetricSpec, Registry, active
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


def counted(name: str) -> bool:
    """Whether the TRES ``name`` (lower-case, as AllocTRES spells it) is one a billing metric
    reads (:func:`decode_tres` counts it); the values of the others are never read."""
    return active().reading(name) is not None


def decode_tres(amounts: Iterable[tuple[str, Amount]]) -> Tres:
    """The one TRES decoder: ``amounts`` are (lower-case AllocTRES name, amount) pairs of the
    :func:`counted` TRES that are set, memory in MiB (its unit depends on the form: each front
    end reads it); a name no metric reads is ignored.

    A GRES metric's typed variants (GPUs: ``gres/gpu:TYPE``) count when its untyped total
    (``gres/gpu``) is absent, as their sum; never both: Slurm lists a typed allocation under
    both names.
    """
    registry = active()
    return _decoded(
        (read, amount)
        for read, amount in ((registry.reading(name), amount) for name, amount in amounts)
        if read is not None
    )


def _decoded(amounts: Iterable[tuple[tuple[MetricSpec, bool], Amount]]) -> Tres:
    """:func:`decode_tres` of amounts whose metric the front end has already looked up
    (``Registry.reading``: the metric, and whether the name is a typed variant)."""
    found: dict[str, Amount] = {}
    typed: dict[str, Amount] = {}
    for (spec, is_typed), amount in amounts:
        if is_typed:
            typed[spec.name] = typed.get(spec.name, 0) + amount
        else:
            found[spec.name] = amount
    for metric, total in typed.items():
        found.setdefault(metric, total)
    return Tres.of(found)


# --- parsable text (AllocTRES) ----------------------------------------------------------------


def parse_tres(text: str) -> Tres:
    """Allocated TRES from ``billing=78,cpu=48,gres/gpu:a100=4,gres/gpu=4,mem=384G,node=1``.

    Memory goes to MiB (``K`` = 1/1024 MiB). GPUs: the untyped ``gres/gpu`` count when present,
    else the sum of the typed ``gres/gpu:TYPE`` counts (never both). TRES no billing metric
    reads are ignored. A malformed item raises ValueError.
    """
    return _parse_tres(text, active())


@lru_cache(maxsize=4096)  # allocations repeat: a few hundred shapes in a whole month
def _parse_tres(text: str, registry: Registry) -> Tres:
    stripped = text.strip()
    if not stripped:
        return Tres.of({})
    amounts: list[tuple[tuple[MetricSpec, bool], Amount]] = []
    seen: set[str] = set()
    for item in stripped.split(","):
        match = _TRES_ITEM_RE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"malformed TRES item {item!r} (expected name=value)")
        name, value = match.group("name").lower(), match.group("value").strip()
        if name in seen:
            raise ValueError(f"TRES {name} appears twice")
        seen.add(name)
        read = registry.reading(name)
        if read is None:
            continue
        if read[0].amount == "size":
            size = _MEM_RE.fullmatch(value)
            if size is None:
                raise ValueError(f"{name}={value!r} is not an amount of memory")
            amounts.append(
                (read, Decimal(size.group("num")) * _MIB_PER_UNIT[size.group("unit").upper()])
            )
        else:
            amounts.append((read, _count(name, value)))
    return _decoded(amounts)


# --- JSON (tres.allocated) ----------------------------------------------------------------------


def tres_from_json(allocated: Any) -> Tres:
    """Allocated TRES from sacct --json's ``tres.allocated`` list (None: no TRES). An item's
    AllocTRES name is ``type/name``, or ``type`` when its name is empty (as Slurm spells it).
    Memory counts are MB, as Slurm counts memory; a count that is not set (``NO_VAL``,
    negative) is skipped. A malformed list or item raises _Bad."""
    if allocated is None:
        return Tres.of({})
    if not isinstance(allocated, list):
        raise _Bad(f"tres.allocated is {_json_snippet(allocated)}, not a list")
    registry = active()
    amounts: list[tuple[tuple[MetricSpec, bool], Amount]] = []
    for item in allocated:
        if not isinstance(item, dict):
            raise _Bad(f"tres.allocated item {_json_snippet(item)} is not an object")
        kind = _jstr(item.get("type"), "tres type").lower()
        name = _jstr(item.get("name"), "tres name").lower()
        count = _jint(item.get("count"), f"tres {kind} count")
        if count is None or count < 0 or count >= _NO_VAL:
            continue  # NO_VAL (e.g. energy -2)
        if "/" in kind:  # a type is one word: "cpu", "mem", "gres", "license", "energy"...
            continue
        read = registry.reading(f"{kind}/{name}" if name else kind)
        if read is not None:
            amounts.append((read, Decimal(count) if read[0].amount == "size" else count))
    return _decoded(amounts)
