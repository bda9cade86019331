"""Domain errors. Only the cli package turns them into messages and exit codes.

Every error says what failed, on which input, and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence


class TrackerError(Exception):
    """Base class of every error slurm-tracker raises on purpose."""


class ConfigError(TrackerError):
    """The configuration is invalid. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"invalid configuration {source} ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n{lines}"
        )


class InputError(TrackerError):
    """Saved sacct input that cannot be read at all (as opposed to one bad record)."""


class TemporaryFailure(TrackerError):
    """Something outside us is unavailable (sacct, slurmdbd, the API, a lock): try again later."""


class SacctUnavailable(TemporaryFailure):
    """sacct could not be run, timed out or exited non-zero."""


class LockHeld(TemporaryFailure):
    """Another slurm-tracker holds the state lock."""


class ApiUnavailable(TemporaryFailure):
    """The Allocations API could not be reached, or kept failing."""


class StateError(TrackerError):
    """The state file is corrupt, foreign, from a newer version, or cannot be opened."""


class StateUnavailable(TemporaryFailure):
    """The state file cannot be written right now (disk full, read-only file system, I/O
    error): nothing is lost, the next run continues where this one stopped."""


class WriterConflict(TrackerError):
    """Another slurm-tracker (another host, or another state file) bills the same cluster:
    syncing too would bill every job twice."""


class UnsafeFile(TrackerError):
    """A file or directory the agent trusts (state, lock, catalog, config, API key) could be
    changed by another user, is a symbolic link, or is not a regular file."""


class ApiError(TrackerError):
    """The Allocations API refused a request permanently (a 4xx other than 408/429)."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"HTTP {status}{f' {code}' if code else ''}: {message}")
