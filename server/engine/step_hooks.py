"""What the engine loop does around its steps besides stepping: tell the step observers (metrics) about each step,
and decide when to hand the heap's free pages back to the OS.

Heap trimming: a prefill step leaves tens of MB of freed temporaries in the heap (activations, a classify's prompt
logits). glibc keeps them (its trim threshold rises with the largest block freed, up to 64 MB), and a busy server
never goes idle to trim, so consecutive prefills ratchet RSS about 100 MB above what the next idle moment returns
(measured in a long mixed-load soak). So the loop trims after a step of at least TRIM_STEP_TOKENS, at most once per
TRIM_INTERVAL_S: a trim costs a few ms to a few tens of ms, small beside a step that long. Decode steps never trim,
because there a trim would show in every stream's inter-token latency; going idle after a burst trims once."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.engine.outputs import StepStats

log = logging.getLogger("loom.engine")

StepObserver = Callable[[StepStats], None]

TRIM_STEP_TOKENS = 256
TRIM_INTERVAL_S = 1.0


class StepObservers:
    """Called on the engine thread after every step that ran sequences. An observer that raises is logged and
    skipped: metrics must never stop the engine."""

    def __init__(self) -> None:
        self._observers: list[StepObserver] = []

    def add(self, observer: StepObserver) -> None:
        self._observers.append(observer)

    def notify(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        if not num_seqs or not self._observers:
            return
        stats = StepStats(num_seqs, num_tokens, seconds)
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # noqa: BLE001 - an observer's bug must not end the engine loop
                log.exception("a step observer failed")


class HeapTrimPolicy:
    """When to trim (the caller trims): after a big step, rate-limited, and once on going idle after work."""

    def __init__(self, step_tokens: int | None = None, interval_s: float | None = None):
        self.step_tokens = TRIM_STEP_TOKENS if step_tokens is None else step_tokens
        self.interval_s = TRIM_INTERVAL_S if interval_s is None else interval_s
        self._busy = False  # a step ran since the last idle trim
        self._trimmed = 0.0  # time.perf_counter() of the last trim after a step

    def after_step(self, step_tokens: int, started: float) -> bool:
        """Trim now, after a step of `step_tokens` that began at `started` (time.perf_counter())?"""
        self._busy = True
        if step_tokens < self.step_tokens or started - self._trimmed < self.interval_s:
            return False
        self._trimmed = time.perf_counter()
        return True

    def on_idle(self) -> bool:
        """Trim now, as the loop finds nothing to do? Only the first time after a burst."""
        busy, self._busy = self._busy, False
        return busy
