"""tools/seed_check.py: the per-run table and the two criteria (every gain, median end)."""

from __future__ import annotations

from tool_import import load_tool

seed_check = load_tool("seed_check")


def record(seed: int, start: float, end: float, threads: int = 1) -> dict:
    return {"seed": seed, "threads": threads, "pass1_start": start, "pass1_end": end, "wall_seconds": 100.0 + seed}


def test_criteria_hold_only_when_every_gain_and_the_median_end_do():
    good = [record(1, 0.30, 0.45), record(2, 0.40, 0.55), record(3, 0.50, 0.62)]
    text, met = seed_check.table(good, min_gain=0.10, min_median=0.5)
    assert met
    assert "| default | 1 | 2 | 0.400 | 0.550 | +0.150 | 102 |" in text
    assert "gain min +0.120, median +0.150, max +0.150; end median 0.550; wall max 103 s" in text
    one_short = good[:2] + [record(3, 0.55, 0.62)]  # +0.07
    assert not seed_check.table(one_short, 0.10, 0.5)[1]
    low_median = [record(1, 0.20, 0.35), record(2, 0.30, 0.45), record(3, 0.50, 0.62)]
    text, met = seed_check.table(low_median, 0.10, 0.5)
    assert not met and "median end >= 0.5: NO" in text
    exactly = [record(1, 0.40, 0.50)]  # a gain of exactly 0.10 in floating point counts
    assert seed_check.table(exactly, 0.10, 0.5)[1]
