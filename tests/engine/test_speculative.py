"""Speculative decoding from n-grams is lossless: on tiny random models whose outputs repeat (so drafts are both
accepted and rejected), greedy and seeded outputs are token-identical to decoding without it — batched with
sequences that do not speculate, with prefix caching, chunked prefill, preemption, stops, penalties, logprobs, n > 1
and grammars — unseeded samples follow the target distribution (chi-square against the model's own probabilities),
and every KV block comes back, aborts included. `auto` speculates only where its measured costs say it pays."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.grammar import GrammarSpec
from server.engine.grammar_compiler import GrammarCompiler
from server.engine.ngram_proposer import NgramIndex
from server.engine.offline import generate
from server.engine.sampler import Sampler
from server.engine.spec_state import FIRST_BACKOFF
from server.engine.speculation import RETRY, Speculator, num_accepted
from server.engine.step_times import StepTimes
from server.model import ModelSettings, load_model
from server.model.dummy import DUMMY_PRESETS
from tests.support.models import make_seq

CHI2_7DF_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def random_model(tmp_path_factory, vocab: int, scale: float):
    """A dummy Llama with `vocab` tokens whose weights are scaled up from the dummy's near-zero ones, so that its
    greedy output wanders, then falls into loops that n-gram drafts partly predict."""
    path = tmp_path_factory.mktemp("spec") / "config.json"
    path.write_text(json.dumps({**DUMMY_PRESETS["tiny"], "vocab_size": vocab, "tie_word_embeddings": False}))
    lm = load_model(ModelSettings(model=f"dummy:{path}", dtype="float32"), progress=False)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return random_model(tmp_path_factory, 512, 3.0)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    out = []
    for i in range(10):
        unit = [rng.randrange(3, 512) for _ in range(rng.randint(3, 7))]
        if i % 3 == 2:  # no repeats of its own: it drafts only once its output repeats
            out.append([rng.randrange(3, 512) for _ in range(rng.randint(5, 30))])
        else:
            out.append((unit * 8)[:rng.randint(10, 40)] + [rng.randrange(3, 512) for _ in range(i % 3)])
    return out


def check_blocks(core: EngineCore) -> None:
    """After a step: a sequence holds blocks for its computed tokens only, and its registered prefix blocks hold
    its own verified tokens."""
    bm = core.block_manager
    for seq in core.scheduler.running:
        assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens)
        assert seq.num_computed_tokens <= seq.num_tokens
        for i in range(seq.num_hashed_blocks):
            assert bm.blocks[seq.block_table[i]].token_ids == tuple(seq.token_ids[i * bm.block_size:(i + 1) *
                                                                                    bm.block_size])


def run(lm, prompts, params, **settings):
    core = EngineCore(lm, EngineSettings(**{"kv_cache_memory": 0.02, "ngram_min": 1, "ngram_max": 3,
                                            "speculative": "ngram", **settings}))
    results = generate(core, prompts, params, on_step=lambda: check_blocks(core))
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"
    assert not core.scheduler.running and not core.scheduler.waiting
    return results, core


GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(lm, prompts):
    return [r[0].token_ids for r in run(lm, prompts, GREEDY, speculative="none")[0]]


def test_ngram_index_longest_most_recent_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 2, 3, 7, 5, 1, 2, 3]
    assert index.propose(tokens, 2) == [9, 2]  # (1, 2, 3) beats the later (2, 3)
    tokens += [4, 2, 3]
    assert index.propose(tokens, 2) == [4, 2]  # (4, 2, 3) is new: (2, 3) matches, at its latest occurrence
    assert NgramIndex(2, 2).propose([5, 6, 5, 6], 5) == [5, 6, 5, 6, 5]  # a repeat continues past the end
    assert NgramIndex(2, 4).propose([1, 2, 3], 3) == []
    grown, fresh = NgramIndex(1, 4), NgramIndex(1, 4)
    rng = random.Random(1)
    seq = [rng.randrange(6) for _ in range(200)]
    for end in range(2, 201):  # growing one token at a time indexes exactly what indexing all at once does
        assert grown.propose(seq[:end], 4) == NgramIndex(1, 4).propose(seq[:end], 4)
    fresh.update(seq)
    assert grown.table == fresh.table


@pytest.mark.parametrize("settings", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=16, num_speculative_tokens=3),  # prompts chunked; drafts cut to the budget
    dict(num_kv_blocks=14, block_size=8),  # preemption and recompute; drafts never take the last blocks
    dict(speculative="auto"),
], ids=["ngram", "no-prefix-cache", "chunked", "preemption", "auto"])
def test_greedy_output_is_identical(lm, prompts, plain, settings):
    results, core = run(lm, prompts, GREEDY, **settings)
    assert [r[0].token_ids for r in results] == plain
    spec = core.speculator
    if settings.get("speculative") != "auto":
        assert 0 < spec.accepted < spec.drafted, "drafts were meant to be both accepted and rejected"
    if "num_kv_blocks" in settings:
        assert core.scheduler.num_preemptions > 0
    assert core.stats().spec_draft_tokens == spec.drafted and core.stats().spec_accepted_tokens == spec.accepted


def test_seeded_sampling_penalties_logprobs_and_n_are_identical(lm, prompts):
    params = [SamplingParams(max_tokens=24, temperature=0.6, top_k=2, top_p=0.95, seed=i, n=2, logprobs=2,
                             ignore_eos=True, repetition_penalty=1.2 if i % 2 else 1.0,
                             frequency_penalty=0.3 if i % 3 == 1 else 0.0) for i in range(len(prompts))]
    params[0] = SamplingParams(max_tokens=24, temperature=0.0, presence_penalty=1.5, logprobs=1, ignore_eos=True)
    base, _ = run(lm, prompts, params, speculative="none")
    spec, core = run(lm, prompts, params)
    assert 0 < core.speculator.accepted < core.speculator.drafted
    for a, b in zip(base, spec):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert [lp.token_id for lp in x.logprobs] == [lp.token_id for lp in y.logprobs] == x.token_ids
            assert [lp.logprob for lp in x.logprobs] == pytest.approx([lp.logprob for lp in y.logprobs], abs=1e-4)
            assert [t for t, _ in x.logprobs[-1].top] == [t for t, _ in y.logprobs[-1].top]


def test_stops_and_limits_drop_tokens_past_them(lm, prompts, plain):
    text = lm.tokenizer.decode
    params = []
    for i, out in enumerate(plain):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=7 + i, temperature=0.0, ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop_token_ids=[out[9]]))
        else:
            params.append(SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                         stop=[text(out[10:12]).strip() or "x"]))
    base, _ = run(lm, prompts, params, speculative="none")
    spec, core = run(lm, prompts, params)
    assert core.speculator.accepted > 0
    assert [(r[0].token_ids, r[0].text, r[0].finish_reason) for r in spec] == \
           [(r[0].token_ids, r[0].text, r[0].finish_reason) for r in base]
    assert [len(r[0].token_ids) for r in spec[::3]] == [7 + i for i in range(0, len(prompts), 3)]


@pytest.fixture(scope="module")
def compiler(lm):
    compiler = GrammarCompiler(lm.tokenizer, lm.config.vocab_size, timeout=30)
    yield compiler
    compiler.shutdown()


def test_grammar_masks_every_verified_position(lm, compiler):
    grammar = compiler.compile(GrammarSpec("regex", "[abcd]( [abcd]){0,30}"))
    prompt = [t for c in "a b c d x y z a b c d x y z a b c d x y z a b" for t in lm.tokenizer.encode(c)]  # < 512
    params = SamplingParams(max_tokens=40, temperature=0.0, grammar=grammar)
    base, _ = run(lm, [prompt] * 2, params, speculative="none")
    spec, core = run(lm, [prompt] * 2, params)
    assert [r[0].token_ids for r in spec] == [r[0].token_ids for r in base]
    assert re.fullmatch("[abcd]( [abcd]){0,30}", spec[0][0].text)
    assert 0 < core.speculator.accepted < core.speculator.drafted


def test_a_draft_the_grammar_refuses_ends_acceptance(lm, compiler):
    a, b, x = (lm.tokenizer.encode(c)[0] for c in "abx")
    seq = make_seq([5], 0, temperature=0.0, grammar=compiler.compile(GrammarSpec("regex", "a[ab]{0,5}")))
    draft = [a, x, b]  # the grammar refuses x after a
    logits = torch.zeros(4, 512)
    for row, token in enumerate(draft):
        logits[row, token] = 10.0  # the model itself would take every draft
    logits[1, b] = logits[3, b] = 5.0  # b is the best token the grammar allows at row 1
    result = Sampler()(logits, [seq] * 4, [draft[:j] for j in range(4)])
    assert result.token_ids[:2] == [a, b] and num_accepted(draft, result.token_ids) == 1
    assert seq.grammar_state.num_accepted == 0 and seq.grammar_state.accept(a)  # rolled back to the start


def test_abort_mid_verification_returns_every_block(lm, prompts):
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.02, speculative="ngram", ngram_min=1))
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    while core.speculator.drafted < 20:
        core.step()
        check_blocks(core)
    for i in range(len(prompts)):
        core.abort(f"r{i}")
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert not core.has_unfinished()


def test_sampled_tokens_follow_the_target_distribution(tmp_path_factory):
    """Vocabulary of 8; every token is in the prompt, so the second token is always drawn through verification of a
    one-token draft. Its empirical distribution must match the model's (the first token's distribution mixed over
    the second's given it), and the third's must match decoding without speculation."""
    small = random_model(tmp_path_factory, 8, 3.0)
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    settings = dict(num_kv_blocks=600, max_num_seqs=512, max_num_batched_tokens=8192, ngram_min=1, ngram_max=1,
                    num_speculative_tokens=1, seed=1234, enable_prefix_caching=False)
    one = SamplingParams(max_tokens=1, temperature=1.0, logprobs=8, ignore_eos=True)
    first = run(small, [prompt], one, **settings)[0][0][0].logprobs[0].top
    nexts = run(small, [prompt + [t] for t, _ in first], one, **settings)[0]
    expected = torch.zeros(8, dtype=torch.float64)
    for (_, lp1), result in zip(first, nexts):
        for t2, lp2 in result[0].logprobs[0].top:
            expected[t2] += torch.tensor(lp1 + lp2, dtype=torch.float64).exp()
    params = SamplingParams(max_tokens=3, temperature=1.0, n=16, ignore_eos=True)
    counts = {}
    for mode in ("none", "ngram"):
        results, core = run(small, [prompt] * 32, params, **{**settings, "speculative": mode})
        tokens = torch.tensor([c.token_ids for r in results for c in r])
        counts[mode] = [torch.bincount(tokens[:, i], minlength=8).double() for i in (1, 2)]
        second = counts[mode][0]
        chi2 = ((second - second.sum() * expected) ** 2 / (second.sum() * expected)).sum()
        assert chi2 < CHI2_7DF_P001, (mode, second.tolist(), expected.tolist())
    assert 0 < core.speculator.accepted < core.speculator.drafted == 512
    a, b = counts["none"][1], counts["ngram"][1]
    assert ((a - b) ** 2 / (a + b).clamp(min=1)).sum() < CHI2_7DF_P001


def decoding(count: int) -> list:
    seqs = [make_seq([5, 6, 7, 5, 6, 7, 5, 6], i, max_tokens=50) for i in range(count)]
    for seq in seqs:
        seq.token_ids.append(7)
        seq.num_computed_tokens = seq.num_tokens - 1
    return seqs


def timed(speculator: Speculator, rows: int, seconds: float) -> None:
    for _ in range(2):  # the first step of a shape is a warm-up, not a measurement
        speculator.times.observe(rows, 9, seconds)


def test_step_times_drop_warm_ups_and_interpolate():
    times = StepTimes()
    times.observe(1, 100, 9.0)
    assert times.estimate(1, 100) is None
    times.observe(1, 100, 1.0)
    times.observe(5, 120, 3.0)
    times.observe(5, 120, 3.0)
    assert times.estimate(1, 128) == 1.0 and times.estimate(3, 100) == 2.0 and times.estimate(6, 100) is None
    assert times.estimate(3, 300) is None  # another context bucket
    times.observe(1, 100, 2.0)
    assert times.estimate(1, 100) == pytest.approx(1.3)


def test_auto_speculates_where_measured_steps_pay_and_backs_off():
    seqs = decoding(3)
    full = {s.seq_id: [5, 6, 7, 5, 6] for s in seqs}
    cheap = Speculator(EngineSettings(speculative="auto"), 1024)
    assert cheap.propose(seqs) == {}  # a plain step of 3 is timed first
    timed(cheap, 3, 0.010)
    assert cheap.propose(seqs) == full  # then the rows, with every draft in full
    timed(cheap, 18, 0.011)
    assert cheap.propose(seqs) == full  # cheap rows: even a 1-in-32 chance pays
    costly = Speculator(EngineSettings(speculative="auto"), 1024)
    timed(costly, 3, 0.010)
    timed(costly, 18, 0.060)
    assert [costly.propose(decoding(3)) for _ in range(RETRY - 1)] == [{}] * (RETRY - 1)
    assert costly.propose(seqs) == full  # now and then the refused rows are timed again
    # a sequence whose drafts fail stops drafting for a while, then tries again from the prior
    moderate = Speculator(EngineSettings(speculative="auto"), 1024)
    timed(moderate, 1, 0.010)
    timed(moderate, 6, 0.015)
    seq = decoding(1)[0]
    assert moderate.propose([seq]) == {seq.seq_id: [5, 6, 7]}  # positions past 3 are not worth their rows
    for _ in range(6):
        moderate.record(seq, 3, 0)
    assert moderate.propose([seq]) == {} and seq.spec.pause == FIRST_BACKOFF
    assert [moderate.propose([seq]) for _ in range(FIRST_BACKOFF)] == [{}] * FIRST_BACKOFF
    assert moderate.propose([seq]) == {seq.seq_id: [5, 6, 7]} and seq.spec.backoff == 2 * FIRST_BACKOFF
    assert Speculator(EngineSettings(speculative="none"), 1024).propose(seqs) == {}


def test_metrics_export_speculation():
    from server.api.metrics import EngineCollector
    from server.engine import EngineStats
    stats = EngineStats(running=0, waiting=0, kv_usage=0.0, num_blocks=1, free_blocks=1, preemptions=0,
                        prefix_hit_tokens=0, prefix_query_tokens=0, prompt_tokens=0, generation_tokens=0, steps=0,
                        spec_draft_tokens=40, spec_accepted_tokens=30)
    values = {m.name: m.samples[0].value for m in EngineCollector(lambda: stats).collect()}
    assert values["loom_spec_decode_draft_tokens"] == 40 and values["loom_spec_decode_accepted_tokens"] == 30
    assert values["loom_spec_decode_acceptance_ratio"] == 0.75
