"""Reading sacct output (slurm_tracker/inputs.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from slurm_tracker import inputs

UTC = timezone.utc


def test_chunks_cover_the_range_exactly() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    windows = inputs.chunks(start, start + timedelta(hours=60), 86400)
    assert [(w.end_at - w.start_at).total_seconds() / 3600 for w in windows] == [24, 24, 12]
    assert all(a.end_at == b.start_at for a, b in zip(windows, windows[1:]))
