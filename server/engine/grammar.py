"""Structured output: grammars compiled by xgrammar, one matcher per constrained sequence, and the batch's
allowed-token bitmask applied to the logits in one vectorized call.

A `GrammarSpec` says what to enforce (a JSON schema, any JSON object, a regex, a choice of strings, an EBNF grammar,
or an xgrammar structural tag, which tool calling uses). `GrammarCompiler` turns a spec into a `Grammar` once (an LRU
cache of futures keyed by the spec, so concurrent requests for one schema share a single compilation), on its own
worker threads and under a time limit: a caller waiting longer than the limit gets a 400-style error while the
compilation finishes in the background (xgrammar cannot be interrupted; it releases the GIL while it works, so
neither the event loop nor the engine thread waits for it). The compiled `Grammar` travels in `SamplingParams`; the
engine core only asks each sequence's `GrammarState` for its mask and advances it with the tokens it accepts."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from server.engine.errors import InvalidRequestError
from server.engine.json_schema import check_schema

log = logging.getLogger("loom.engine")

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True)
class GrammarSpec:
    """What to enforce. `value` is canonical text (a schema or a choice list as JSON, a regex, EBNF), so equal specs
    hash equal and share one compiled grammar."""
    kind: Kind
    value: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:  # key order kept: it is the order properties are generated in
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def structural_tag(cls, tag: dict) -> GrammarSpec:
        return cls("structural_tag", json.dumps(tag, separators=(",", ":"), ensure_ascii=False))


class Grammar:
    """A compiled grammar, immutable and shared by every request (and every sequence) that uses its spec."""

    def __init__(self, spec: GrammarSpec, compiled: Any, compile_seconds: float):
        self.spec, self.compiled, self.compile_seconds = spec, compiled, compile_seconds

    def new_state(self) -> GrammarState:
        return GrammarState(self)

    def __repr__(self) -> str:
        return f"Grammar({self.spec.kind}, {self.spec.value[:60]!r})"


class GrammarState:
    """One sequence's position in its grammar. `num_accepted` output tokens have been fed to the matcher; `sync`
    replays any the matcher has not seen (a state built anew for a recomputed or resumed sequence catches up)."""

    def __init__(self, grammar: Grammar):
        import xgrammar as xgr
        self.grammar = grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.num_accepted = 0

    def sync(self, output_token_ids: list[int]) -> None:
        for token in output_token_ids[self.num_accepted:]:
            self.accept(token)

    def accept(self, token: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (the state is unchanged then)."""
        if self.matcher.is_terminated() or not self.matcher.accept_token(token):
            return False
        self.num_accepted += 1
        return True

    @property
    def vocab_size(self) -> int:
        """Tokens the grammar's bitmask covers (the model's output width, padding included)."""
        return self.grammar.compiled.tokenizer_info.vocab_size

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing more may be generated."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def apply_grammar_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> torch.Tensor:
    """Set to -inf every logit that a row's grammar forbids, for all constrained rows at once. Rows without a state
    are left alone. Columns beyond the grammar's vocabulary (padding of the model's output layer) are forbidden."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    import xgrammar as xgr
    vocab = logits.shape[1]
    covered = states[rows[0]].vocab_size
    bitmask = xgr.allocate_token_bitmask(len(states), covered)
    for row in rows:
        states[row].fill(bitmask, row)
    logits = logits.clone()
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(vocab, covered), indices=rows)
    if vocab > covered:
        logits[rows, covered:] = float("-inf")
    return logits


def _lower_priority() -> None:
    """Compile threads yield the CPU to the engine (a Linux thread's nice value is its own)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class GrammarCompiler:
    """Compiles specs for one tokenizer (and the model's vocabulary size, which may exceed the tokenizer's) on
    `workers` background threads, caching the last `cache_size` distinct specs."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256, workers: int = 2,
                 timeout: float = 10.0):
        self.tokenizer, self.vocab_size, self.cache_size, self.timeout = tokenizer, vocab_size, cache_size, timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "loom-grammar", initializer=_lower_priority)
        self._cache: OrderedDict[GrammarSpec, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self.hits = self.misses = 0

    def _xgr_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr
                hf = self.tokenizer.hf
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=max(self.vocab_size, len(hf)), stop_token_ids=sorted(self.tokenizer.eos_token_ids))
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def submit(self, spec: GrammarSpec) -> concurrent.futures.Future:
        """The future of `spec`'s grammar: cached, already compiling, or queued now. A failed compilation is not
        cached (the next request tries again and gets the same error)."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(spec)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: GrammarSpec, param: str | None = None, timeout: float | None = None) -> Grammar:
        """Blocking compile (tests, offline use); errors as in `compile_async`."""
        future = self.submit(spec)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            raise self._too_slow(param, timeout) from None
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param, exc.code) from None

    async def compile_async(self, spec: GrammarSpec, param: str | None = None,
                            timeout: float | None = None) -> Grammar:
        """The grammar for `spec`, awaited without blocking the event loop. InvalidRequestError naming `param` if
        the spec is not valid or not enforceable, or if compiling takes longer than the time limit."""
        future = self.submit(spec)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                          self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise self._too_slow(param, timeout) from None
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param, exc.code) from None

    def _too_slow(self, param: str | None, timeout: float | None) -> InvalidRequestError:
        limit = self.timeout if timeout is None else timeout
        return InvalidRequestError(f"the grammar took longer than {limit:g} s to compile; simplify the schema "
                                   f"(it keeps compiling in the background and is cached if it finishes)", param,
                                   "grammar_compile_timeout")

    def _compile(self, spec: GrammarSpec) -> Grammar:
        import time
        started = time.perf_counter()
        compiler = self._xgr_compiler()
        try:
            compiled = self._build(compiler, spec)
        except InvalidRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar reports every parse/convert failure as RuntimeError
            raise InvalidRequestError(f"invalid {spec.kind.replace('_', ' ')}: {_xgr_message(exc)}") from None
        seconds = time.perf_counter() - started
        log.debug("grammar compiled", extra={"kind": spec.kind, "seconds": round(seconds, 4)})
        return Grammar(spec, compiled, seconds)

    @staticmethod
    def _build(compiler, spec: GrammarSpec):
        if spec.kind == "json_schema":
            schema = json.loads(spec.value)
            check_schema(schema, None)
            return compiler.compile_json_schema(schema, any_whitespace=False)
        if spec.kind == "json_object":
            return compiler.compile_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            options = json.loads(spec.value)
            if not options or not all(isinstance(o, str) and o for o in options):
                raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.value)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(json.loads(spec.value))
        raise InvalidRequestError(f"unknown grammar kind {spec.kind!r}")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _xgr_message(exc: Exception) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location; keep what a client can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
