"""The billing metrics: ONE table of what a partition's SKU can charge (``{sku, metric}``).

A metric is an allocated resource held for the run's elapsed time. Its usage is the amount the
run's AllocTRES allocates of it, in the billed unit (the TRES's own amount divided by ``per``:
memory is counted in MiB and billed in GB of 1024 MiB), times ElapsedRaw / 3600: core-hours,
GPU-hours, GB-hours... Everything that knows metrics reads this table, so that adding one is
ONE entry in :data:`BUILTIN` and nothing else:

- the TRES decoder (:mod:`slurm_tracker.parse_tres`): which AllocTRES names are read, for both
  the text and the JSON form, how (a count, or an amount of memory with its unit), and the
  GRES rule (the untyped ``gres/gpu`` total, else the sum of the typed ``gres/gpu:TYPE``
  counts, never both);
- a run's amounts (:class:`slurm_tracker.models.Tres`: ``tres.count(metric)``);
- the config (``partitions.map``: the metric names accepted, did-you-mean);
- the dry run's totals (the unit names for people, ``models.METRIC_UNITS``);
- the corrections kept in the state file (one key per metric in the stored record's TRES; a
  key a row does not have is 0, and a key the code does not know is ignored, so rows written
  before or after a metric was added are read both ways);
- the cost report (which allocated resource a metric's SKU is priced under).

Only rates fit this model: an amount *held* for a time. A consumed total, such as the energy
of a job, does not: the joules are already integrated over the run (``ConsumedEnergyRaw``, or
``TRESUsageInTot``'s ``energy``; AllocTRES's ``energy`` is not what a job used, sacct --json
gives it as -2, "not set"), and they grow while the run runs. Billing such a total once per
run at its end, or its growth at every sync, would need the state file to keep how much of it
each run was billed so far, as it keeps the seconds; it keeps seconds only. So there is no
energy metric, and an entry has no "kind": every metric is count x hours.

The table in use is :func:`active` (the built-in one). :func:`using` swaps it for the time of
a ``with`` block (tests, or a site's extension): the stages look it up when they run, never
at import time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Optional, Union

__all__ = [
    "BUILTIN",
    "COST_RESOURCES",
    "MIB_PER_GB",
    "Amount",
    "MetricSpec",
    "Registry",
    "active",
    "using",
]

#: How much of a TRES a run holds: a count, or an amount of memory in MiB.
Amount = Union[int, Decimal]

MIB_PER_GB = Decimal(1024)  # Slurm's "G" is 1024 MiB; memory GB-hours use the same GB.

#: The resources of the cost report's allocated cost; "other" is what node and billing SKUs
#: (and any metric that is not CPU, memory or GPU) charge.
COST_RESOURCES = ("cpu", "mem", "gpu", "other")

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_TRES_RE = re.compile(r"[a-z][a-z0-9_/:.\-]*")


@dataclass(frozen=True)
class MetricSpec:
    """One billing metric.

    ``name``: its name in the config (``{sku: CODE, metric: NAME}``) and in each event's
    metadata (``metric``). ``tres``: the AllocTRES name it reads, lower-case as sacct prints it
    (the JSON form's ``type/name``, or ``type`` when the name is empty). ``typed``: a GRES whose
    typed variants ``<tres>:TYPE`` count too: their sum when the untyped total is absent, never
    added to it (Slurm lists a typed allocation under both names). ``amount``: ``count`` (a
    whole number) or ``size`` (memory: the text form has a unit K, M, G, T or P and is read in
    MiB; the JSON form counts MB). ``per``: how much of the TRES's own amount is one billed
    unit (None: the amount itself). ``unit``: what one unit of usage is called, for people.
    ``resource``: where the cost report prices its SKUs (one of :data:`COST_RESOURCES`).
    ``field``: the run's attribute (``tres.<field>``) and the key of its amount in the
    corrections kept in the state file; the name unless given.
    """

    name: str
    tres: str
    unit: str
    resource: str = "other"
    per: Optional[Decimal] = None
    amount: Literal["count", "size"] = "count"
    typed: bool = False
    field: str = ""

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.name)
        problems = []
        if not _NAME_RE.fullmatch(self.name) or not _NAME_RE.fullmatch(self.field):
            problems.append("name and field must be lower-case words (a-z, 0-9, _)")
        if not _TRES_RE.fullmatch(self.tres):
            problems.append(f"TRES {self.tres!r} is not a lower-case AllocTRES name")
        if self.resource not in COST_RESOURCES:
            problems.append(f"resource {self.resource!r} is not one of {COST_RESOURCES}")
        if self.per is not None and not (self.per.is_finite() and self.per > 0):
            problems.append(f"per {self.per} is not a positive number")
        if self.amount not in ("count", "size"):
            problems.append(f"amount {self.amount!r} is not count or size")
        if not self.unit.strip():
            problems.append("no unit name")
        if problems:
            raise ValueError(f"metric {self.name!r}: " + "; ".join(problems))

    @property
    def zero(self) -> Amount:
        """The amount of a run that does not hold this TRES."""
        return Decimal(0) if self.amount == "size" else 0


class Registry:
    """An ordered table of metrics, looked up by name, by field and by the TRES they read."""

    def __init__(self, specs: Iterable[MetricSpec]) -> None:
        self.specs: tuple[MetricSpec, ...] = tuple(specs)
        self.names: tuple[str, ...] = tuple(s.name for s in self.specs)
        self._by_name = {s.name: s for s in self.specs}
        self._by_field = {s.field: s for s in self.specs}
        self._by_tres = {s.tres: s for s in self.specs}
        #: (``<tres>:``, metric) of the typed GRES
        self._typed = tuple((f"{s.tres}:", s) for s in self.specs if s.typed)
        for what, index in (("name", self._by_name), ("field", self._by_field)):
            if len(index) != len(self.specs):
                raise ValueError(f"two metrics have the same {what}")
        if len(self._by_tres) != len(self.specs):
            raise ValueError("two metrics read the same TRES")

    def __iter__(self) -> Iterator[MetricSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> MetricSpec:
        """The metric ``name`` (KeyError: not a metric)."""
        return self._by_name[name]

    def get(self, name: str) -> Optional[MetricSpec]:
        return self._by_name.get(name)

    def by_field(self, field: str) -> Optional[MetricSpec]:
        return self._by_field.get(field)

    def reading(self, tres: str) -> Optional[tuple[MetricSpec, bool]]:
        """The metric that reads the AllocTRES name ``tres`` (lower-case) and whether ``tres``
        is a typed variant of its GRES; None when no metric reads it."""
        spec = self._by_tres.get(tres)
        if spec is not None:
            return spec, False
        for prefix, typed in self._typed:
            if tres.startswith(prefix):
                return typed, True
        return None

    def extended(self, *specs: MetricSpec) -> Registry:
        """This table with ``specs`` added after its own."""
        return Registry((*self.specs, *specs))


#: The metrics the agent bills, in the order the config's messages list them.
BUILTIN: tuple[MetricSpec, ...] = (
    MetricSpec("cpu", tres="cpu", unit="core-hours", resource="cpu"),
    MetricSpec("gpu", tres="gres/gpu", unit="GPU-hours", resource="gpu", typed=True),
    MetricSpec("node", tres="node", unit="node-hours"),
    MetricSpec(
        "mem",
        tres="mem",
        unit="GB-hours",
        resource="mem",
        per=MIB_PER_GB,
        amount="size",
        field="mem_mb",
    ),
    MetricSpec("billing", tres="billing", unit="billing-hours"),
)

_active = Registry(BUILTIN)


def active() -> Registry:
    """The table in use (the built-in one, unless :func:`using` swapped it)."""
    return _active


@contextmanager
def using(registry: Registry) -> Iterator[Registry]:
    """Use ``registry`` for the time of the ``with`` block (process-wide, not thread-local),
    e.g. ``with using(active().extended(MetricSpec(...))):``."""
    global _active  # noqa: PLW0603 - the one switch, restored on the way out
    before = _active
    _active = registry
    try:
        yield registry
    finally:
        _active = before
