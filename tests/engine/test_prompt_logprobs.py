"""Prompt logprobs (what echo/perplexity and classification use) against Hugging Face, through chunking, the prefix
cache (`prompt_logprobs_start`) and preemption; and the queue time on a request's first delta."""
import pytest
import torch

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from tests.support.models import hf_model, load_fp32, random_prompts


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    return load_fp32(path), hf_model(path)


def hf_prompt_logprobs(hf, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lsm = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [lsm[i - 1, ids[i]].item() for i in range(1, len(ids))]


def score(core, prompts, start=1, max_tokens=0):
    params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=2, prompt_logprobs_start=start,
                            temperature=0.0, ignore_eos=True)
    return [r[0].prompt_logprobs for r in generate(core, prompts, params)]


@pytest.mark.parametrize("settings", [dict(), dict(max_num_batched_tokens=16, block_size=4)])
def test_prompt_logprobs_match_hf(llama, settings):
    lm, hf = llama
    prompts = random_prompts(3, 10, 60, seed=5)
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.01, **settings))
    for prompt, got in zip(prompts, score(core, prompts)):
        assert len(got) == len(prompt) and got[0] is None
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got[1:]]),
                                   torch.tensor(hf_prompt_logprobs(hf, prompt)), atol=2e-4, rtol=0)
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in got[1:])
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_prefix_cache_serves_tokens_before_start(llama):
    lm, hf = llama
    context = random_prompts(1, 40, 40, seed=6)[0]
    answers = [[11, 12, 13], [21, 22]]
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.01, block_size=8))
    score(core, [context + [5]])  # caches the context's full blocks
    results = score(core, [context + a for a in answers], start=len(context))
    assert core.scheduler.prefix_hit_tokens >= 2 * 32
    for answer, got in zip(answers, results):
        want = hf_prompt_logprobs(hf, context + answer)[len(context) - 1:]
        assert all(lp is None for lp in got[1:33])  # served by the cache
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got[len(context):]]), torch.tensor(want),
                                   atol=2e-4, rtol=0)


def test_rows_before_start_take_no_logits(llama, monkeypatch):
    """Cold cache: the whole context is prefilled, but only the rows that predict a token from
    `prompt_logprobs_start` on go through the LM head (a classify's context would cost [T, vocab] logits)."""
    lm, hf = llama
    context, answer = random_prompts(1, 40, 40, seed=8)[0], [11, 12, 13]
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.01, block_size=8, enable_prefix_caching=False))
    rows, real = [], lm.model.compute_logits
    monkeypatch.setattr(lm.model, "compute_logits", lambda hidden: (rows.append(len(hidden)), real(hidden))[1])
    got = score(core, [context + answer], start=len(context))[0]
    assert rows == [len(answer) + 1]  # positions 39..42: three answer tokens, and the last row samples
    assert len(got) == len(context) + len(answer) and all(lp is None for lp in got[:len(context)])
    want = hf_prompt_logprobs(hf, context + answer)[len(context) - 1:]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got[len(context):]]), torch.tensor(want),
                               atol=2e-4, rtol=0)


def test_preempted_scoring_request_records_each_token_once(llama):
    lm, _ = llama
    prompts = random_prompts(6, 30, 40, seed=7)
    free_run = score(EngineCore(lm, EngineSettings(kv_cache_memory=0.01, block_size=4)), prompts, max_tokens=8)
    core = EngineCore(lm, EngineSettings(num_kv_blocks=12, block_size=4, max_num_batched_tokens=20))
    tight = score(core, prompts, max_tokens=8)  # sequences that keep growing force preemption
    assert core.scheduler.num_preemptions > 0
    for a, b in zip(free_run, tight):
        assert len(a) == len(b)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in a[1:]]),
                                   torch.tensor([lp.logprob for lp in b[1:]]), atol=1e-5, rtol=0)


def test_queue_time_on_first_delta(llama):
    lm, _ = llama
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.01, max_num_seqs=1))
    for i in range(2):
        core.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    firsts = {}
    while core.has_unfinished():
        for out in core.step().outputs:
            firsts.setdefault(out.request_id, out)
            if out.request_id in firsts and out is not firsts[out.request_id]:
                assert out.queue_time is None
    assert firsts["r0"].queue_time >= 0 and firsts["r1"].queue_time > firsts["r0"].queue_time
