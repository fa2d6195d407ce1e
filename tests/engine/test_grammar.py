"""Structured output in the engine: the sampler's vectorized grammar mask (only allowed tokens are ever drawn, rows
without a grammar are untouched, the model's padded vocabulary is masked), and constrained requests on a tiny random
model that finish with valid output under n > 1, seeds, logprobs, stop strings and preemption, returning every KV
block."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time

import jsonschema
import pytest
import torch

from server.engine import EngineCore, EngineSettings, InvalidRequestError, SamplingParams, ServerBusyError
from server.engine.grammar import GRAMMAR_DEAD_END, GrammarSpec, apply_grammar_masks
from server.engine.grammar_compiler import GrammarCompiler
from server.engine.offline import generate
from server.engine.sampler import Sampler
from tests.support.models import make_seq

VOCAB = 64


class FixedMask:
    """A grammar state stand-in that allows a fixed set of tokens."""

    def __init__(self, allowed: set[int], vocab_size: int = VOCAB):
        self.allowed, self.vocab_size, self.num_accepted = allowed, vocab_size, 0

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = [0] * bitmask.shape[1]
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        bitmask[row] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def constrained(seq, allowed):
    seq.grammar_state = FixedMask(allowed)
    return seq


def test_mask_allows_only_the_grammars_tokens_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 5
    allowed = {3, 40, 63}
    seqs = [constrained(make_seq([1], 0, temperature=1.0, seed=7), allowed), make_seq([1], 1, temperature=1.0, seed=8),
            constrained(make_seq([1], 2, temperature=0.0), {33}), make_seq([1], 3, temperature=0.0)]
    seen = set()
    for step in range(200):
        result = Sampler(seed=step)(logits, seqs)
        seen.add(result.token_ids[0])
        assert result.token_ids[2] == 33 and result.token_ids[3] == int(logits[3].argmax())
    assert seen <= allowed and len(seen) > 1, seen
    # the unconstrained seeded row draws exactly what it draws without any grammar in the batch
    plain = [make_seq([1], 0, temperature=1.0, seed=7), make_seq([1], 1, temperature=1.0, seed=8)]
    mixed = [constrained(make_seq([1], 0, temperature=1.0, seed=7), allowed), make_seq([1], 1, temperature=1.0, seed=8)]
    for _ in range(20):
        assert Sampler()(logits[:2], mixed).token_ids[1] == Sampler()(logits[:2], plain).token_ids[1]


def test_mask_comes_before_top_k_and_penalties():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 10.0  # the model's favourite is forbidden: top_k=1 must pick among the allowed ones
    logits[0, 9] = 2.0
    seq = constrained(make_seq([1], 0, temperature=1.0, top_k=1, repetition_penalty=1.5, seed=1), {9, 10})
    assert all(Sampler()(logits, [seq]).token_ids == [9] for _ in range(10))


def test_padded_vocabulary_columns_are_masked():
    logits = torch.zeros(2, VOCAB + 37)
    logits[:, VOCAB:] = 100.0  # padding columns beyond the grammar's vocabulary
    out = apply_grammar_masks(logits, [FixedMask({1, 2}), None])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1, 2]
    assert torch.equal(out[1], logits[1])


@pytest.fixture(scope="module")
def compiler(dummy_lm):
    return GrammarCompiler(dummy_lm.tokenizer, dummy_lm.config.vocab_size, timeout=30)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "c": {"enum": ["red", "green"]}}, "required": ["n", "c"]}


def test_compiles_are_cached_and_bad_specs_refused(compiler):
    a = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    assert compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(SCHEMA)))) is a
    for spec, needle in [(GrammarSpec("regex", "[a-z"), "regex"), (GrammarSpec("grammar", 'root ::= "a" | b'), "grammar"),
                         (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
                         (GrammarSpec.json_schema({"type": "nope"}), "invalid JSON schema")]:
        with pytest.raises(InvalidRequestError, match=needle) as info:
            compiler.compile(spec, param="p")
        assert info.value.param == "p"


def test_constrained_requests_finish_valid_and_return_their_blocks(dummy_lm, compiler):
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=8, block_size=16, max_model_len=512))
    schema = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    regex = compiler.compile(GrammarSpec("regex", r"[a-z]{1,4}@(x|y)\.com"))
    choice = compiler.compile(GrammarSpec.choice(["alpha", "beta gamma"]))
    prompt = dummy_lm.tokenizer.encode("Give me some data: ")
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, n=2, grammar=schema, logprobs=1) for s in range(3)]
    params += [SamplingParams(max_tokens=40, temperature=0.0, grammar=regex),
               SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=3, grammar=choice, stop=["zzz"]),
               SamplingParams(max_tokens=12, temperature=1.0, seed=5)]  # unconstrained, beside them
    results = generate(core, [prompt] * len(params), params)
    assert core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"
    for group in results[:3]:
        for c in group:
            assert c.finish_reason == "stop" and len(c.logprobs) == len(c.token_ids)
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert results[3][0].finish_reason == "stop" and re.fullmatch(r"[a-z]{1,4}@(x|y)\.com", results[3][0].text)
    assert all(c.text in ("alpha", "beta gamma") and c.finish_reason == "stop" for c in results[4])


def test_max_tokens_cut_reports_length(dummy_lm, compiler):
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=64, max_model_len=512))
    grammar = compiler.compile(GrammarSpec("regex", "[a-z]{50}"))
    (c,), = generate(core, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0.0, grammar=grammar))
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and re.fullmatch("[a-z]+", c.text)


def test_state_rebuilt_by_replaying_output_tokens(dummy_lm, compiler):
    grammar = compiler.compile(GrammarSpec.choice(["alpha", "beta gamma"]))
    tokens = dummy_lm.tokenizer.encode("beta gamma", add_special_tokens=False)
    seq = make_seq([1, 2], 0, grammar=grammar)
    seq.token_ids += tokens
    seq.grammar_state = grammar.new_state()  # e.g. after a restart: knows nothing yet
    logits = torch.zeros(1, dummy_lm.config.vocab_size)
    eos = min(dummy_lm.tokenizer.eos_token_ids)
    assert Sampler()(logits, [seq]).token_ids == [eos]  # caught up: only the stop token is left
    assert seq.grammar_state.num_accepted == len(tokens)


# -- compile congestion: abandoned compiles stop, congestion is "busy", never a timeout blamed on a simple grammar --
def slow_choice(tag: str, n: int = 50_000) -> GrammarSpec:
    """A choice that takes tens of seconds to compile (far past any limit below): it only ever runs until stopped."""
    return GrammarSpec.choice([f"{tag}-{i:05d}-option" for i in range(n)])


def test_a_compile_over_its_limit_is_stopped_and_frees_its_worker(dummy_lm):
    compiler = GrammarCompiler(dummy_lm.tokenizer, dummy_lm.config.vocab_size, workers=1, timeout=1.5)
    try:
        compiler.compile(GrammarSpec("regex", "[a-z]"))  # the compile process is up (its start is not timed)
        started = time.monotonic()
        with pytest.raises(InvalidRequestError) as info:
            compiler.compile(slow_choice("a"), param="p")
        assert info.value.code == "grammar_compile_timeout" and info.value.param == "p"
        assert 1.5 <= time.monotonic() - started < 4
        started = time.monotonic()
        compiler.compile(GrammarSpec("regex", "[0-9]{3}"))  # the one worker is free again at once
        assert time.monotonic() - started < 3
    finally:
        compiler.shutdown()


def test_a_compile_nobody_waits_for_is_stopped_at_once(dummy_lm):
    compiler = GrammarCompiler(dummy_lm.tokenizer, dummy_lm.config.vocab_size, workers=1, timeout=120)

    async def scenario() -> float:
        await compiler.compile_async(GrammarSpec("regex", "[a-z]"))
        waiting = asyncio.ensure_future(compiler.compile_async(slow_choice("b")))
        await asyncio.sleep(0.5)  # it compiles
        waiting.cancel()  # its client went away
        started = time.monotonic()
        await compiler.compile_async(GrammarSpec("regex", "[0-9]{3}"))
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 3
    finally:
        compiler.shutdown()


def test_congestion_is_busy_with_a_retry_after(dummy_lm):
    """One worker and a queue of one: a third new grammar is refused at once; a queued one whose compile cannot
    start within the limit is refused after it. Both as ServerBusyError with the time until a worker is free."""
    compiler = GrammarCompiler(dummy_lm.tokenizer, dummy_lm.config.vocab_size, workers=1, timeout=2, queue_size=2)
    try:
        compiler.compile(GrammarSpec("regex", "[a-z]"))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = pool.submit(compiler.compile, slow_choice("c"))
            time.sleep(0.3)
            queued = [pool.submit(compiler.compile, slow_choice("d")), pool.submit(compiler.compile, slow_choice("e"))]
            time.sleep(0.3)
            with pytest.raises(ServerBusyError) as full:
                compiler.compile(GrammarSpec("regex", "[0-9]{3}"))
            assert full.value.code == "grammar_compiler_busy" and 1 <= full.value.retry_after <= 2
            assert "2 compiles are already waiting" in str(full.value)
            with pytest.raises(InvalidRequestError, match="longer than 2 s"):
                running.result()
            outcomes = [f.exception() for f in queued]  # "d" ran once "c" stopped; "e" waited past its limit
            assert any(isinstance(e, ServerBusyError) and "no compile worker was free" in str(e) for e in outcomes)
            assert all(isinstance(e, (ServerBusyError, InvalidRequestError)) for e in outcomes), outcomes
    finally:
        compiler.shutdown()


@pytest.mark.parametrize("spec, needle", [
    (GrammarSpec("regex", r"[^\s\S]"), "matches no text"), (GrammarSpec("grammar", "root ::= root"), "matches no text"),
    (GrammarSpec("regex", "a^b"), "cannot be enforced exactly"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "^(?!x)[a-z]$"}), "lookahead"),
])
def test_unsatisfiable_or_partly_ignored_grammars_are_refused(compiler, spec, needle):
    with pytest.raises(InvalidRequestError, match=needle) as info:
        compiler.compile(spec, param="p")
    assert info.value.param == "p"


def test_a_grammar_dead_end_finishes_cleanly(dummy_lm, compiler):
    """`a[^\\s\\S]` allows "a", then nothing: the sequence ends there with its own finish reason, never an error."""
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=64, max_model_len=512))
    grammar = compiler.compile(GrammarSpec("regex", r"a[^\s\S]"))
    params = [SamplingParams(max_tokens=10, temperature=0.0, grammar=grammar),
              SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=2, grammar=grammar),
              SamplingParams(max_tokens=6, temperature=1.0, seed=4)]  # unconstrained, beside them
    results = generate(core, [[1, 2, 3]] * 3, params)
    for c in results[0] + results[1]:
        assert (c.text, c.finish_reason) == ("a", GRAMMAR_DEAD_END), c
    assert results[2][0].finish_reason == "length"
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_a_compile_process_that_cannot_start_is_busy_not_a_crash(monkeypatch):
    """The fork server gone (a server stopping while a grammar compiles): the waiter gets a 503-style busy error and
    the worker closes the child that never started without raising."""
    import multiprocessing.process
    import threading

    from server.engine.grammar_worker import CompileProcess

    def broken_start(self):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", broken_start)
    process = CompileProcess()
    with pytest.raises(ServerBusyError, match="could not start") as err:
        process.compile("{}", "json_schema", "{}", 5.0, threading.Event())
    assert err.value.code == "grammar_compiler_busy"
    process.close()
    assert process._process is None and process._conn is None
