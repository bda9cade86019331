"""The report's time grid: 15-minute intervals aligned on UTC, clipped to the period.

Times are whole epoch seconds here; a stretch of a run is split exactly by seconds, so the
seconds of its pieces add up to the stretch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

INTERVAL_S = 900
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def epoch(at: datetime) -> int:
    return int((at - _EPOCH).total_seconds())


def instant(seconds: int) -> datetime:
    return _EPOCH + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Grid:
    """Intervals ``[base + i x size, base + (i + 1) x size)`` clipped to ``[start, end)``."""

    start: int
    end: int
    size: int = INTERVAL_S

    @classmethod
    def of(cls, start_at: datetime, end_at: datetime, size: int = INTERVAL_S) -> Grid:
        if size <= 0:
            raise ValueError("the interval must be at least one second")
        return cls(epoch(start_at), epoch(end_at), size)

    @property
    def base(self) -> int:
        return self.start - self.start % self.size

    def __len__(self) -> int:
        if self.end <= self.start:
            return 0
        return (self.end - 1 - self.base) // self.size + 1

    def bounds(self, index: int) -> tuple[int, int]:
        low = self.base + index * self.size
        return max(low, self.start), min(low + self.size, self.end)

    def index(self, second: int) -> int:
        return (second - self.base) // self.size

    def seconds(self, index: int) -> int:
        low, high = self.bounds(index)
        return high - low

    def split(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """(interval index, seconds) of ``[low, high)`` clipped to the grid, in order."""
        low, high = max(low, self.start), min(high, self.end)
        if high <= low:
            return
        for index in range(self.index(low), self.index(high - 1) + 1):
            first, last = self.bounds(index)
            yield index, min(high, last) - max(low, first)
