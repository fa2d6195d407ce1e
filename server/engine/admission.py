"""Admission: the queue caps (`max_waiting` sequences, `max_waiting_tokens` unprefilled prompt tokens) over every
request accepted but not yet running, whether it still sits in the engine's inbox or already in the scheduler.
Both threads count under one lock, so concurrent submissions can never overshoot a cap; a refusal carries a
Retry-After estimated from how fast the queue drains.

A task request (a zero-shot classify, a summarize) is one request to its client but many engine requests (one per
label, chunk...). `task()` admits it once, as one sequence; the engine requests it sends from inside that context
skip the caps, the first taking over the reserved slot: so a task is refused or accepted whole, never half-run and
then failed on its own 40th scoring request. Its engine requests then wait like any others (a task bounds how many
it has in flight, server/tasks/common.MAX_IN_FLIGHT), so requests that arrive behind them see the queue as full."""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from server.engine.errors import QueueFullError


class DrainRate:
    """How fast the queue drains: sequences admitted and prompt tokens prefilled per second, over the last
    `window` seconds of steps."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.samples: deque[tuple[float, int, int]] = deque()

    def record(self, now: float, admitted: int, prefilled: int) -> None:
        self.samples.append((now, admitted, prefilled))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()

    def seconds_to_drain(self, seqs: int, tokens: int) -> int | None:
        """Seconds until `seqs` more sequences and `tokens` more prompt tokens have left the queue (None: no
        estimate, nothing drained yet)."""
        if len(self.samples) < 2 or self.samples[-1][0] <= self.samples[0][0]:
            return None
        (t0, a0, p0), (t1, a1, p1) = self.samples[0], self.samples[-1]
        seq_rate, token_rate = (a1 - a0) / (t1 - t0), (p1 - p0) / (t1 - t0)
        if (seqs > 0 and seq_rate <= 0) or (tokens > 0 and token_rate <= 0):
            return None
        wait = max(seqs / seq_rate if seqs > 0 else 0.0, tokens / token_rate if tokens > 0 else 0.0)
        return min(max(math.ceil(wait), 1), 300)


@dataclass
class _TaskTicket:
    held: bool = True  # still holds the one waiting slot `task()` reserved (no engine request of it sent yet)


_current_task: contextvars.ContextVar[_TaskTicket | None] = contextvars.ContextVar("loom_task", default=None)


class Admission:
    def __init__(self, max_waiting: int = 0, max_waiting_tokens: int = 0):
        self.max_waiting, self.max_waiting_tokens = max_waiting, max_waiting_tokens
        self.drain = DrainRate()
        self._lock = threading.Lock()
        self._inbox_seqs = self._inbox_tokens = 0  # accepted, not yet taken from the inbox by the engine thread
        self._core_seqs = self._core_tokens = 0  # waiting in the scheduler, as last counted after a step

    def admit(self, seqs: int, tokens: int) -> None:
        """Count a new engine request's sequences as waiting, or raise QueueFullError if that would pass a cap.
        Inside `task()` the request is already admitted: it only takes over the task's reserved slot."""
        ticket = _current_task.get()
        with self._lock:
            if ticket is None:
                self._check(seqs, tokens)
            elif ticket.held:
                ticket.held = False
                self._inbox_seqs -= 1
            self._inbox_seqs += seqs
            self._inbox_tokens += tokens

    def queued(self) -> tuple[int, int]:
        """(sequences, prompt tokens) counted as waiting now, in the inbox and in the scheduler."""
        with self._lock:
            return self._inbox_seqs + self._core_seqs, self._inbox_tokens + self._core_tokens

    def _check(self, seqs: int, tokens: int) -> None:
        waiting, queued_tokens = self._inbox_seqs + self._core_seqs, self._inbox_tokens + self._core_tokens
        over_seqs = waiting + seqs - self.max_waiting if self.max_waiting else 0
        # a prompt larger than the token cap is still admitted into an empty queue, or it could never run
        over_tokens = queued_tokens + tokens - self.max_waiting_tokens \
            if self.max_waiting_tokens and queued_tokens else 0
        if over_seqs > 0 or over_tokens > 0:
            limit = (f"{waiting} sequences waiting, limit {self.max_waiting}" if over_seqs > 0 else
                     f"{queued_tokens} prompt tokens waiting, limit {self.max_waiting_tokens}")
            raise QueueFullError(f"the queue is full ({limit})",
                                 self.drain.seconds_to_drain(max(over_seqs, 0), max(over_tokens, 0)))

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Admit a task request as one sequence (QueueFullError if the queue is full; its prompt tokens are counted
        as its engine requests send them); the engine requests sent from inside the block (and from asyncio tasks it
        starts) are part of it."""
        with self._lock:
            self._check(1, 0)
            self._inbox_seqs += 1
        ticket = _TaskTicket()
        reset = _current_task.set(ticket)
        try:
            yield
        finally:
            _current_task.reset(reset)
            with self._lock:
                if ticket.held:  # it never sent a request (refused, or failed before)
                    ticket.held = False
                    self._inbox_seqs -= 1

    @contextlib.contextmanager
    def entering_scheduler(self, seqs: int, tokens: int) -> Iterator[None]:
        """Engine thread: move a request's sequences from the inbox to the scheduler (added inside the block; if
        that raises, they are in neither)."""
        with self._lock:
            self._inbox_seqs -= seqs
            self._inbox_tokens -= tokens
            yield
            self._core_seqs += seqs
            self._core_tokens += tokens

    def count_scheduler(self, seqs: int, tokens: int, now: float, admitted: int, prefilled: int) -> None:
        """Engine thread, after the scheduler moved sequences: what waits there now, and the drain so far."""
        with self._lock:
            self._core_seqs, self._core_tokens = seqs, tokens
        self.drain.record(now, admitted, prefilled)
