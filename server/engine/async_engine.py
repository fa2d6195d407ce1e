"""The engine's asyncio face. The step loop runs off the event loop (torch releases the GIL inside its ops, so the
event loop keeps serving HTTP while a step computes); requests and aborts reach it through a queue, outputs come
back to each request's asyncio queue.

By default the loop gets its own thread. `loom serve` instead runs it on the process's main thread (`run()`) and
puts HTTP on a second thread: GNU OpenMP, which torch's CPU ops use, throttles its worker threads' spin-waiting
once it manages more threads than there are cores, and every parallel op then pays a sleep/wake-up. Measured on
2 cores, default model, 16 sequences: 44 ms per decode step with the loop on the main thread, 66 ms on a second
thread (linear 73 vs 212 us, silu 15 vs 76 us)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.engine.engine_core import EngineCore
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger("loom.engine")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    sink: Callable[[RequestOutput | BaseException], None]


StepObserver = Callable[[int, int, float], None]  # (sequences, tokens, seconds) per step


class AsyncEngine:
    def __init__(self, core: EngineCore, max_waiting: int | None = None, on_step: StepObserver | None = None,
                 own_thread: bool = True):
        self.core = core
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.max_waiting = core.settings.max_waiting if max_waiting is None else max_waiting
        self.on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._unfinished: dict[str, int] = {}  # request id -> sequences (of n) not yet finished
        self._stopping = False
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        self._running = True  # without its own thread, the owner is about to call run()
        self._thread = threading.Thread(target=self._loop, name="loom-engine", daemon=True) if own_thread else None
        if self._thread is not None:
            self._thread.start()

    # -- the public interface -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        alive = self._thread.is_alive() if self._thread is not None else self._running
        return self.error is None and alive and not self._stopping

    def run(self) -> None:
        """Run the step loop on the calling thread until `shutdown()` (for an engine built with own_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this engine already runs its loop on its own thread")
        try:
            self._loop()
        finally:
            self._running = False

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its deltas. Leaving the iteration early (client gone) aborts it."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if self.max_waiting and self.core.scheduler and len(self.core.scheduler.waiting) >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting")
        self.core.check_request(prompt_token_ids, params)  # fail fast, on the caller's side, with a clear error
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone; nobody is listening
                pass

        self._send(_Submit(request_id, prompt_token_ids, params, priority, sink))
        remaining = params.n
        try:
            while remaining:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        stats = self.core.stats()
        stats.healthy = self.healthy
        return stats

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------
    def _send(self, message) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Submit):
                try:
                    self.core.add_request(message.request_id, message.prompt_token_ids, message.params,
                                          message.priority)
                    self._sinks[message.request_id] = message.sink
                    self._unfinished[message.request_id] = message.params.n
                except InvalidRequestError as exc:
                    message.sink(exc)
            else:
                _, request_id = message
                for out in self.core.abort(request_id):
                    self._deliver(out)
                self._sinks.pop(request_id, None)
                self._unfinished.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        sink(out)
        if out.finished:
            self._unfinished[out.request_id] -= 1
            if self._unfinished[out.request_id] == 0:
                del self._sinks[out.request_id], self._unfinished[out.request_id]

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.core.has_unfinished():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self.last_step_time = time.monotonic()
                    continue
                started = time.perf_counter()
                outputs = self.core.step()
                self.last_step_time = time.monotonic()
                if self.on_step and self.core.last_step_seqs:
                    self.on_step(self.core.last_step_seqs, self.core.last_step_tokens, time.perf_counter() - started)
                for out in outputs:
                    self._deliver(out)
        except BaseException as exc:  # fatal: mark unhealthy and fail every caller instead of leaving them hanging
            log.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"engine stopped: {exc!r}")
            for sink in self._sinks.values():
                sink(dead)
            self._sinks.clear()
            self._unfinished.clear()
