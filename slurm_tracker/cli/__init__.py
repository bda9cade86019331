"""Command-line interface: the only package that prints and chooses exit codes.

`main` (the `slurm-tracker` group), the exit codes (listed in common.py's docstring, which the
man page prints), error handling and the shared options are in common.py; each module below
adds one family of commands to `main` when it is imported, so importing this package
registers every command. Output formats: slurm_tracker.output (one renderer per format),
printed by common.emit.
"""

from __future__ import annotations

from slurm_tracker.cli import (  # noqa: F401  (each registers its commands on main)
    catalog,
    migrate,
    outbox,
    reconcile,
    report,
    state,
    status,
    sync,
)
from slurm_tracker.cli.common import main

__all__ = ["main"]
