"""The engine's asyncio face. The step loop runs off the event loop (torch releases the GIL inside its ops, so the
event loop keeps serving HTTP while a step computes); requests and aborts reach it through a queue, outputs come
back to each request's asyncio queue.

By default the loop gets its own thread. `loom serve` instead runs it on the process's main thread (`run()`) and
puts HTTP on a second thread: GNU OpenMP, which torch's CPU ops use, throttles its worker threads' spin-waiting
once it manages more threads than there are cores, and every parallel op then pays a sleep/wake-up. Measured on
2 cores, default model, 16 sequences: 44 ms per decode step with the loop on the main thread, 66 ms on a second
thread (linear 73 vs 212 us, silu 15 vs 76 us).

The public part of `AsyncEngine` is what callers outside the engine use (server/api/__init__.py lists it). The
engine thread's loop is `EngineLoop` (engine_loop.py), with its bookkeeping beside it: in-flight requests and their
deadlines (inflight.py), the queue caps (admission.py), step observers and heap trimming (step_hooks.py), encoder
batches (encoder.py)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from server.engine.admission import Admission
from server.engine.encoder import EncodeBatchStats, EncodeJob, EncoderBatcher
from server.engine.engine_core import EngineCore
from server.engine.engine_loop import Abort, EngineLoop, Submit
from server.engine.errors import EngineDeadError
from server.engine.grammar import Grammar, GrammarSpec
from server.engine.grammar_compiler import GrammarCompiler
from server.engine.outputs import EngineStats, Liveness, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.step_hooks import StepObserver


def _threadsafe_sink(loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None]) -> Callable[[object], None]:
    """A sink for the engine thread that hands each item to `deliver` on the caller's event loop."""

    def sink(item) -> None:
        try:
            loop.call_soon_threadsafe(deliver, item)
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            pass

    return sink


class AsyncEngine:
    def __init__(self, core: EngineCore, max_waiting: int | None = None, own_thread: bool = True,
                 encoders: EncoderBatcher | None = None):
        self.core = core
        self.encoder_batcher = encoders or EncoderBatcher({})
        self.encoders = self.encoder_batcher.encoders  # name -> LoadedEncoder (embedding / classifier models)
        self.limits = core.limits
        self.loras = core.loras  # LoRA adapters by name: load, unload, get (server/engine/lora_registry.py)
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.admission = Admission(core.settings.max_waiting if max_waiting is None else max_waiting,
                                   core.settings.max_waiting_tokens)
        self.grammars = GrammarCompiler(core.tokenizer, core.lm.config.vocab_size,
                                        cache_size=core.settings.grammar_cache_size,
                                        workers=core.settings.grammar_compile_workers,
                                        timeout=core.settings.grammar_compile_timeout,
                                        queue_size=core.settings.grammar_compile_queue)
        self._loop = EngineLoop(core, self.admission, self.encoder_batcher)
        self._running = True  # without its own thread, the owner is about to call run()
        self._thread = threading.Thread(target=self._loop.run, name="loom-engine", daemon=True) if own_thread else None
        if self._thread is not None:
            self._thread.start()

    # -- the public interface -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The loop runs and is not shutting down: new requests can be served."""
        return self.liveness().alive and not self._loop.stopping

    def liveness(self) -> Liveness:
        alive = self._thread.is_alive() if self._thread is not None else self._running
        error = self._loop.error
        return Liveness(alive=alive and error is None, last_step_time=self._loop.last_step_time, error=error)

    @property
    def vocab_size(self) -> int:
        """Token ids this engine's model accepts are in [0, vocab_size)."""
        return self.limits.vocab_size

    def admit_task(self) -> contextlib.AbstractContextManager[None]:
        """Admit a task request (a summarize, a zero-shot classify) against the queue caps once, as one sequence:
        QueueFullError if the queue is full. The engine requests sent from inside the block are part of it
        (server/engine/admission.py)."""
        return self.admission.task()

    def add_step_observer(self, observer: StepObserver) -> None:
        """Called on the engine thread after every step that ran sequences (metrics)."""
        self._loop.observers.add(observer)

    def add_encode_observer(self, observer: Callable[[EncodeBatchStats], None]) -> None:
        """Called on the engine thread after every encoder batch (metrics)."""
        self.encoder_batcher.observers.append(observer)

    async def encode(self, model: str, inputs: list[list[int]], request_id: str | None = None,
                     deadline: float | None = None) -> list[list[float]]:
        """Run token-id sequences through encoder `model`: one output row per input (a pooled embedding, or a
        classifier's probabilities). Batched with every other client's sequences on the engine thread; `deadline`
        as for `generate`. Cancelling the call aborts the request: its sequences not yet run are dropped."""
        self._require_healthy()
        self.encoder_batcher.check(model, inputs)
        request_id = request_id or uuid.uuid4().hex
        future: asyncio.Future = asyncio.get_running_loop().create_future()

        def settle(result) -> None:
            if not future.done():
                (future.set_exception if isinstance(result, BaseException) else future.set_result)(result)

        self._loop.send(EncodeJob(request_id, model, inputs, deadline, _threadsafe_sink(future.get_loop(), settle)))
        try:
            return await future
        finally:
            if future.cancelled():  # the caller left: cancelling its task cancelled the awaited future too
                self.abort(request_id)

    def run(self) -> None:
        """Run the step loop on the calling thread until `shutdown()` (for an engine built with own_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this engine already runs its loop on its own thread")
        try:
            self._loop.run()
        finally:
            self._running = False

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its deltas. Failures raise typed `EngineError`s (invalid request,
        queue full, timeout, engine dead, internal). `deadline` (a `time.monotonic()` value) is enforced by the
        engine thread, queue time included: past it the request is aborted and raises `RequestTimeoutError`.
        Leaving the iteration early (client gone) aborts the request."""
        self._require_healthy()
        max_tokens = self.limits.check(prompt_token_ids, params)
        self.admission.admit(params.n, params.n * len(prompt_token_ids))
        request_id = request_id or uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        sink = _threadsafe_sink(asyncio.get_running_loop(), outputs.put_nowait)
        self._loop.send(Submit(request_id, prompt_token_ids, params, max_tokens, priority, deadline, sink))
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
        engine thread; InvalidRequestError naming `param` if it is invalid or takes too long to compile,
        ServerBusyError if the compilers are congested (server/engine/grammar_compiler.py)."""
        return await self.grammars.compile_async(spec, param)

    def warm_grammars(self) -> None:
        """Start the grammar compile processes in the background, where the settings ask for it."""
        if self.core.settings.grammar_warmup:
            self.grammars.warm()

    def abort(self, request_id: str) -> None:
        self._loop.send(Abort(request_id))

    def stats(self) -> EngineStats:
        stats = self.core.stats()
        stats.healthy = self.healthy
        return stats

    def shutdown(self, timeout: float = 5.0) -> None:
        self._loop.stop()
        self.grammars.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _require_healthy(self) -> None:
        if not self.healthy:
            raise EngineDeadError(f"engine is not running: {self._loop.error!r}")
