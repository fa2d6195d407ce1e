"""Compiling grammars for structured output: each distinct spec once, off the event loop and the engine thread,
with bounded cost.

A spec that is cached answers at once; one already compiling is shared by every request that asks for it; a new
one joins a bounded queue served by `workers` compile processes (server/engine/grammar_worker.py). Two limits,
both `timeout` seconds, keep the cost bounded and the blame right:
- a compile that runs longer than `timeout` is stopped, and its requests get 400 `grammar_compile_timeout` (the
  grammar itself is too slow to compile);
- a request whose compile has not started within `timeout`, or that finds the queue full, gets
  `ServerBusyError` (503 `grammar_compiler_busy`, with the time until a worker is sure to be free): congestion,
  not the grammar's fault.
A compile that no request waits for any more (each timed out or went away) is dropped from the queue or, if it is
running, stopped at once: abandoned work never holds a worker."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from server.engine.errors import EngineDeadError, EngineError, InvalidRequestError, ServerBusyError
from server.engine.grammar import Grammar, GrammarSpec
from server.engine.grammar_worker import CompileProcess, CompileStopped
from server.engine.json_schema import enforceable_schema

log = logging.getLogger("loom.engine")


@dataclass(eq=False)
class CompileJob:
    spec: GrammarSpec
    started: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)  # a worker took it
    result: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)  # Grammar or error
    abandoned: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0
    started_at: float | None = None  # time.monotonic()


class GrammarCompiler:
    """Compiles specs for one tokenizer (and the model's vocabulary size, which may exceed the tokenizer's),
    caching the last `cache_size` distinct grammars; at most `queue_size` compiles wait for a worker."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256, workers: int = 2,
                 timeout: float = 10.0, queue_size: int = 8):
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.timeout, self.queue_size = timeout, queue_size
        self._lock = threading.Condition()
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._jobs: dict[GrammarSpec, CompileJob] = {}  # queued or running
        self._queue: deque[CompileJob] = deque()
        self._closed = False
        self._info: tuple[Any, str] | None = None
        self._info_lock = threading.Lock()
        self.hits = self.misses = 0
        self._in_native = 0  # workers inside xgrammar's C++ in this process (guarded by _native_done)
        self._native_done = threading.Condition()
        for i in range(workers):
            threading.Thread(target=self._serve, name=f"loom-grammar-{i}", daemon=True).start()

    # -- waiting for a grammar ----------------------------------------------------------------------------------
    def compile(self, spec: GrammarSpec, param: str | None = None) -> Grammar:
        """Blocking compile (tests, offline use); errors as in `compile_async`."""
        job = self._join(spec)
        if isinstance(job, Grammar):
            return job
        try:
            try:
                job.started.result(self.timeout)
            except concurrent.futures.TimeoutError:
                raise self._busy("no compile worker was free") from None
            return job.result.result()
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param, exc.code) from None
        finally:
            self._leave(job)

    async def compile_async(self, spec: GrammarSpec, param: str | None = None) -> Grammar:
        """The grammar for `spec`, awaited without blocking the event loop. InvalidRequestError naming `param` if
        the spec is not valid, not enforceable, or too slow to compile; ServerBusyError if the compilers are
        congested. Cancelling the caller abandons its share of the compile."""
        job = self._join(spec)
        if isinstance(job, Grammar):
            return job
        try:
            try:
                await asyncio.wait_for(asyncio.shield(_awaitable(job.started)), self.timeout)
            except asyncio.TimeoutError:
                raise self._busy("no compile worker was free") from None
            return await asyncio.shield(_awaitable(job.result))
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param, exc.code) from None
        finally:
            self._leave(job)

    def _join(self, spec: GrammarSpec) -> Grammar | CompileJob:
        """The cached grammar, or the job to wait for (shared, or queued now), counted as waited for."""
        with self._lock:
            if self._closed:
                raise EngineDeadError("the grammar compiler has shut down")
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return grammar
            job = self._jobs.get(spec)
            if job is None:
                if len(self._queue) >= self.queue_size:
                    raise self._busy(f"{len(self._queue)} compiles are already waiting")
                job = self._jobs[spec] = CompileJob(spec)
                self._queue.append(job)
                self._lock.notify()
                self.misses += 1
            else:
                self.hits += 1
            job.waiters += 1
            return job

    def _leave(self, job: CompileJob) -> None:
        """A waiter is done; the last one to leave an unfinished job abandons it (dequeued, or stopped)."""
        with self._lock:
            job.waiters -= 1
            if job.waiters or job.result.done():
                return
            job.abandoned.set()
            if self._jobs.get(job.spec) is job:
                del self._jobs[job.spec]
            if job.started_at is None:
                if job in self._queue:  # (shutdown empties the queue)
                    self._queue.remove(job)
                job.started.cancel()
                job.result.cancel()

    def _busy(self, why: str) -> ServerBusyError:
        """Congestion, with the time until some worker is sure to be free (running compiles end by their limit)."""
        with self._lock:
            now = time.monotonic()
            ends = [job.started_at + self.timeout - now for job in self._jobs.values() if job.started_at is not None]
        wait = max(1, math.ceil(min(ends, default=self.timeout)))
        return ServerBusyError(f"the grammar compilers are busy ({why}); retry in {wait} s", "grammar_compiler_busy",
                               wait)

    # -- the workers ----------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        process = CompileProcess()
        try:
            while (job := self._next()) is not None:
                outcome = self._run(process, job)
                with self._lock:
                    if self._jobs.get(job.spec) is job:
                        del self._jobs[job.spec]
                    if isinstance(outcome, Grammar):
                        self._cache[job.spec] = outcome
                        while len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
                    waited = job.waiters > 0
                if isinstance(outcome, Grammar):
                    job.result.set_result(outcome)
                elif outcome is not None:
                    job.result.set_exception(outcome)
                elif waited:  # stopped while someone waits: only at shutdown
                    job.result.set_exception(EngineDeadError("the grammar compiler has shut down"))
                else:  # abandoned: cancelled, so that no waiter that left is told of an error
                    job.result.cancel()
        finally:
            process.close()

    def _next(self) -> CompileJob | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            job = self._queue.popleft()
            job.started_at = time.monotonic()
            job.started.set_result(None)
            return job

    def _run(self, process: CompileProcess, job: CompileJob) -> Grammar | Exception | None:
        """The job's grammar, or the error its waiters get; None if it was abandoned (its process stopped)."""
        started = time.perf_counter()
        try:
            kind, text = compile_request(job.spec)
            with self._native():
                info, info_json = self._tokenizer_info()
            compiled = process.compile(info_json, kind, text, self.timeout, job.abandoned)
            import xgrammar as xgr
            with self._native():
                grammar = Grammar(job.spec, xgr.CompiledGrammar.deserialize_json(compiled, info),
                                  time.perf_counter() - started)
        except EngineError as exc:  # invalid (400), or no compile process could start (503)
            return exc
        except CompileStopped as exc:
            if exc.reason == "abandoned":
                return None
            return InvalidRequestError(f"the grammar took longer than {self.timeout:g} s to compile; simplify it",
                                       code="grammar_compile_timeout")
        log.debug("grammar compiled", extra={"kind": job.spec.kind, "seconds": round(grammar.compile_seconds, 4)})
        return grammar

    def _tokenizer_info(self) -> tuple[Any, str]:
        """xgrammar's view of the tokenizer, and its serialized form for the compile processes."""
        with self._info_lock:
            if self._info is None:
                import xgrammar as xgr
                hf = self.tokenizer.hf
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=max(self.vocab_size, len(hf)), stop_token_ids=sorted(self.tokenizer.eos_token_ids))
                self._info = info, info.serialize_json()
            return self._info

    def warm(self) -> None:
        """Start the compile processes in the background with a trivial grammar, so the first structured request
        does not wait seconds for them."""
        def compile_trivial() -> None:
            try:
                self.compile(GrammarSpec("regex", "[0-9]"))
            except EngineError as exc:  # a start that fails here fails again, loudly, for the request that needs it
                if not self._closed:
                    log.warning("grammar compiler warm-up failed", extra={"error": str(exc)})

        threading.Thread(target=compile_trivial, name="loom-grammar-warmup", daemon=True).start()

    @contextlib.contextmanager
    def _native(self) -> Iterator[None]:
        with self._native_done:
            self._in_native += 1
        try:
            yield
        finally:
            with self._native_done:
                self._in_native -= 1
                self._native_done.notify_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers and their processes; queued and running compiles are abandoned. Waits for workers inside
        xgrammar's C++ (its threads, left running while the interpreter exits, abort the process); the rest are
        Python waiting on a child, which is killed."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                job.abandoned.set()
            for job in self._queue:
                job.started.set_exception(EngineDeadError("the grammar compiler has shut down"))
            self._queue.clear()
            self._lock.notify_all()
        with self._native_done:
            self._native_done.wait_for(lambda: self._in_native == 0, timeout)


def _awaitable(future: concurrent.futures.Future) -> asyncio.Future:
    """`future` for the event loop; its outcome counts as read, since a waiter that left never reads it."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
    return wrapped


def compile_request(spec: GrammarSpec) -> tuple[str, str]:
    """What the compile process is given for `spec`: (kind, text), checked and, for schemas, made enforceable."""
    if spec.kind == "json_schema":
        schema = enforceable_schema(json.loads(spec.value), None)
        return "json_schema", json.dumps(schema, ensure_ascii=False)
    if spec.kind == "choice":
        options = json.loads(spec.value)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
        return "grammar", "root ::= " + " | ".join(json.dumps(o) for o in options)
    if spec.kind in ("json_object", "regex", "grammar", "structural_tag"):
        return spec.kind, spec.value
    raise InvalidRequestError(f"unknown grammar kind {spec.kind!r}")
