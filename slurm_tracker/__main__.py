"""`python -m slurm_tracker` runs the command-line interface."""

from __future__ import annotations

from slurm_tracker.cli import main

if __name__ == "__main__":
    main()
