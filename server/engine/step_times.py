"""Wall time of decode steps by their number of rows and context length, learned from the steps the engine runs.

Speculative decoding's `auto` weighs a verify step with it: verification runs draft rows on the decode path, so a
step of R rows costs what a decode step of R rows costs, whether the rows are R sequences or fewer sequences with
drafts, and plain decodes and verify steps both teach it. No step is run to measure: only steps that ran anyway
count. The first step of a shape is dropped (it builds kernels and plans for a new batch size); later ones feed a
moving average, so the table follows the machine as its load changes. Contexts are bucketed by powers of two (rows
read every cached token of their sequence)."""
from __future__ import annotations

from dataclasses import dataclass

WEIGHT = 0.3  # of the newest step in the moving average


@dataclass
class _Entry:
    count: int = 0
    seconds: float = 0.0


def context_bucket(context: int) -> int:
    return max(1 << (max(context, 1) - 1).bit_length(), 64)


class StepTimes:
    def __init__(self) -> None:
        self._entries: dict[int, dict[int, _Entry]] = {}  # context bucket -> rows -> entry

    def observe(self, rows: int, context: int, seconds: float) -> None:
        entry = self._entries.setdefault(context_bucket(context), {}).setdefault(rows, _Entry())
        entry.count += 1
        if entry.count == 2:
            entry.seconds = seconds
        elif entry.count > 2:
            entry.seconds += WEIGHT * (seconds - entry.seconds)

    def estimate(self, rows: int, context: int) -> float | None:
        """Seconds of a decode step of `rows` rows: measured, or interpolated between the nearest measured row counts
        on either side; None when there is no such pair."""
        known = {r: e.seconds for r, e in self._entries.get(context_bucket(context), {}).items() if e.count > 1}
        if rows in known:
            return known[rows]
        below = max((r for r in known if r < rows), default=None)
        above = min((r for r in known if r > rows), default=None)
        if below is None or above is None:
            return None
        return known[below] + (known[above] - known[below]) * (rows - below) / (above - below)
