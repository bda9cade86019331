"""slurm-tracker: bills Slurm job usage to the Allocations API, exactly once."""

from __future__ import annotations

__version__ = "0.2.0"
