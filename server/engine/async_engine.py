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
import ctypes
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.engine.admission import Admission
from server.engine.encoder import EncodeBatchStats, EncodeJob, EncoderBatcher, moving_average
from server.engine.engine_core import EngineCore
from server.engine.errors import EngineDeadError, EngineError, RequestTimeoutError
from server.engine.grammar import Grammar, GrammarCompiler, GrammarSpec
from server.engine.outputs import EngineStats, RequestOutput, StepStats
from server.engine.sampling_params import SamplingParams

log = logging.getLogger("loom.engine")

Sink = Callable[[RequestOutput | BaseException], None]
StepObserver = Callable[[StepStats], None]


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved by the limits check on the caller's side
    priority: int
    deadline: float | None  # time.monotonic() by which the request must be done, else it is aborted
    sink: Sink


def trim_heap() -> None:
    """glibc's malloc_trim(0): return the free pages of the heap (a burst's step temporaries) to the OS, so RSS falls
    back after a burst instead of staying at its high-water mark. A no-op where there is no glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
# A prefill step leaves tens of MB of freed temporaries in the heap (activations, a classify's prompt logits); glibc
# keeps them (its trim threshold rises with the largest block freed, up to 64 MB) and a busy server never goes idle
# to trim, so consecutive prefills ratchet RSS ~100 MB above what the next idle moment returns (issue 14's soak).
# After a step of at least TRIM_STEP_TOKENS, at most once per TRIM_INTERVAL_S, the loop trims: 3-17 ms (Zen 4) after
# a step of 0.25-2 s. Decode steps never trim (a trim there would show in the inter-token latency).
TRIM_STEP_TOKENS = 256
TRIM_INTERVAL_S = 1.0


class AsyncEngine:
    def __init__(self, core: EngineCore, max_waiting: int | None = None, own_thread: bool = True,
                 encoders: EncoderBatcher | None = None):
        self.core = core
        self.encoder_batcher = encoders or EncoderBatcher({})
        self.encoders = self.encoder_batcher.encoders  # name -> LoadedEncoder (embedding / classifier models)
        self.limits = core.limits
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.admission = Admission(core.settings.max_waiting if max_waiting is None else max_waiting,
                                   core.settings.max_waiting_tokens)
        self._observers: list[StepObserver] = []
        self.grammars = GrammarCompiler(core.tokenizer, core.lm.config.vocab_size,
                                        cache_size=core.settings.grammar_cache_size,
                                        timeout=core.settings.grammar_compile_timeout)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Sink] = {}
        self._unfinished: dict[str, int] = {}  # request id -> sequences (of n) not yet finished
        self._deadlines: dict[str, float] = {}  # request id -> time.monotonic() deadline
        self._stopping = False
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        self._step_seconds: float | None = None  # moving average of the engine steps' wall time
        self._running = True  # without its own thread, the owner is about to call run()
        self._thread = threading.Thread(target=self._loop, name="loom-engine", daemon=True) if own_thread else None
        if self._thread is not None:
            self._thread.start()

    # -- the public interface -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        alive = self._thread.is_alive() if self._thread is not None else self._running
        return self.error is None and alive and not self._stopping

    def add_step_observer(self, observer: StepObserver) -> None:
        """Called on the engine thread after every step that ran sequences (metrics)."""
        self._observers.append(observer)

    def add_encode_observer(self, observer: Callable[[EncodeBatchStats], None]) -> None:
        """Called on the engine thread after every encoder batch (metrics)."""
        self.encoder_batcher.observers.append(observer)

    async def encode(self, model: str, inputs: list[list[int]], request_id: str | None = None,
                     deadline: float | None = None) -> list[list[float]]:
        """Run token-id sequences through encoder `model`: one output row per input (a pooled embedding, or a
        classifier's probabilities). Batched with every other client's sequences on the engine thread; `deadline`
        as for `generate`. Cancelling the call aborts the request."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        self.encoder_batcher.check(model, inputs)
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result) -> None:
            if not future.done():
                (future.set_exception if isinstance(result, BaseException) else future.set_result)(result)

        def sink(result) -> None:
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:  # the caller's event loop is gone
                pass

        self._send(EncodeJob(request_id, model, inputs, deadline, sink))
        try:
            return await future
        finally:
            if not future.done():
                self.abort(request_id)

    def run(self) -> None:
        """Run the step loop on the calling thread until `shutdown()` (for an engine built with own_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this engine already runs its loop on its own thread")
        try:
            self._loop()
        finally:
            self._running = False

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its deltas. Failures raise typed `EngineError`s (invalid request,
        queue full, timeout, engine dead, internal). `deadline` (a `time.monotonic()` value) is enforced by the
        engine thread, queue time included: past it the request is aborted and raises `RequestTimeoutError`.
        Leaving the iteration early (client gone) aborts the request."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        max_tokens = self.limits.check(prompt_token_ids, params)
        self.admission.admit(params.n, params.n * len(prompt_token_ids))
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone; nobody is listening
                pass

        self._send(_Submit(request_id, prompt_token_ids, params, max_tokens, priority, deadline, sink))
        remaining = params.n
        try:
            while remaining:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    remaining = 0  # the engine has already dropped the request
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    async def compile_grammar(self, spec: GrammarSpec, param: str | None = None) -> Grammar:
        """Compile (or fetch from the cache) the grammar of a structured-output request, off the event loop and the
        engine thread; InvalidRequestError naming `param` if it is invalid or takes too long to compile."""
        return await self.grammars.compile_async(spec, param)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        stats = self.core.stats()
        stats.healthy = self.healthy
        return stats

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.grammars.shutdown()
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
            if isinstance(message, EncodeJob):
                self.encoder_batcher.add(message)
            elif isinstance(message, _Submit):
                seqs, tokens = message.params.n, message.params.n * len(message.prompt_token_ids)
                try:  # inbox -> scheduler: the new sequences wait there, their prompts unprefilled
                    with self.admission.entering_scheduler(seqs, tokens):
                        self.core.add_request(message.request_id, message.prompt_token_ids, message.params,
                                              message.priority, message.max_tokens)
                except EngineError as exc:
                    message.sink(exc)
                    continue
                self._sinks[message.request_id] = message.sink
                self._unfinished[message.request_id] = message.params.n
                if message.deadline is not None:
                    self._deadlines[message.request_id] = message.deadline
            else:
                _, request_id = message
                job = self.encoder_batcher.abort(request_id)
                if job is not None:  # (a caller that left ignores this; the drain's abort answers with it)
                    job.sink(EngineDeadError("the request was aborted"))
                for out in self.core.abort(request_id):
                    self._deliver(out)
                self._forget(request_id)
                self._count_waiting()

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._unfinished.pop(request_id, None)
        self._deadlines.pop(request_id, None)

    def _expire(self) -> None:
        """Abort every request past its deadline (its blocks are freed now) and fail it with a timeout."""
        self.encoder_batcher.expire(time.monotonic())
        if not self._deadlines:
            return
        now = time.monotonic()
        expired = [r for r, when in self._deadlines.items() if when <= now]
        for request_id in expired:
            self.core.abort(request_id)  # its last deltas are dropped: the caller gets the timeout instead
            self._fail(request_id, RequestTimeoutError("the request did not finish within its timeout"))
        if expired:
            self._count_waiting()

    def _count_waiting(self) -> None:
        """After the scheduler moved sequences (admitted, preempted, finished), count what still waits there. The
        token count walks every waiting and running sequence, so it is only taken when a token cap needs it."""
        waiting = self.core.num_waiting_seqs()
        tokens = self.core.num_unprefilled_tokens() if self.admission.max_waiting_tokens else 0
        self.admission.count_scheduler(waiting, tokens, time.monotonic(), self.core.scheduler.num_admitted,
                                       self.core.prefilled_tokens)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        sink(out)
        if out.finished:
            self._unfinished[out.request_id] -= 1
            if self._unfinished[out.request_id] == 0:
                self._forget(out.request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        sink = self._sinks.get(request_id)
        self._forget(request_id)
        if sink is not None:
            sink(error)

    def _loop(self) -> None:
        busy, trimmed = False, 0.0
        try:
            while not self._stopping:
                self._drain_inbox()
                self._expire()
                if self.encoder_batcher.has_work():  # one encoder batch between two decode steps, about as long
                    batcher = self.encoder_batcher
                    decoding = self.core.has_unfinished() and self._step_seconds is not None
                    batcher.step(batcher.budget_for(self._step_seconds) if decoding else None)
                    self.last_step_time = time.monotonic()
                if not self.core.has_unfinished():
                    if self.encoder_batcher.has_work():
                        continue
                    if busy:  # just went idle: hand the heap the last burst freed back to the OS
                        busy = False
                        trim_heap()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self.last_step_time = time.monotonic()
                    continue
                started, busy = time.perf_counter(), True
                result = self.core.step()
                self.last_step_time = time.monotonic()
                # the encoder batches' time bound while streams decode
                self._step_seconds = moving_average(self._step_seconds, time.perf_counter() - started)
                self._count_waiting()
                if self.core.last_step_seqs and self._observers:
                    stats = StepStats(self.core.last_step_seqs, self.core.last_step_tokens,
                                      time.perf_counter() - started)
                    for observer in self._observers:
                        observer(stats)
                for out in result.outputs:
                    self._deliver(out)
                for request_id, error in result.failed.items():
                    self._fail(request_id, error)
                if self.core.last_step_tokens >= TRIM_STEP_TOKENS and started - trimmed >= TRIM_INTERVAL_S:
                    trimmed = time.perf_counter()  # after the step's outputs went out: the trim delays no token
                    trim_heap()
        except BaseException as exc:  # fatal: mark unhealthy and fail every caller instead of leaving them hanging
            log.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"engine stopped: {exc!r}")
            for sink in [*self._sinks.values(), *(job.sink for job in self.encoder_batcher.jobs.values())]:
                sink(dead)
            self.encoder_batcher.jobs.clear()
            self._sinks.clear()
            self._unfinished.clear()
            self._deadlines.clear()
