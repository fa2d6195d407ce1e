"""Continuous batching changes nothing about greedy outputs: 16 prompts of mixed lengths submitted together give
the same tokens as one at a time — with prefix caching on and off, with tiny prefill chunks, and with a KV pool so
small that sequences are preempted and recomputed. Every run must return all of its KV blocks."""
import pytest

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate

MAX_TOKENS = 10
SHARED = ("You are a helpful assistant. Answer briefly and precisely, in plain English, without lists. "
          "Think about the question first. ")
TOPICS = ["rivers", "the moon", "bread", "volcanoes", "chess", "music", "bees", "glass"]


@pytest.fixture(scope="module")
def prompts(default_model_fp32):
    tok = default_model_fp32.tokenizer
    out = []
    for i, topic in enumerate(TOPICS):  # half share a long prefix (prefix-cache hits), half are short or long
        out.append(tok.encode(SHARED + f"Tell me one fact about {topic}."))
        out.append(tok.encode(f"{topic.title()}:" + " and more" * (i * 7 % 40)))
    return out


def run(lm, prompts, **settings) -> tuple[list[list[int]], EngineCore]:
    core = EngineCore(lm, EngineSettings(**{"kv_cache_memory": 0.25, **settings}))
    results = generate(core, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"
    assert not core.scheduler.running and not core.scheduler.waiting
    return [r[0].token_ids for r in results], core


@pytest.fixture(scope="module")
def one_at_a_time(default_model_fp32, prompts):
    return [run(default_model_fp32, [p], enable_prefix_caching=False)[0][0] for p in prompts]


@pytest.mark.parametrize("settings", [
    dict(enable_prefix_caching=True),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=48, block_size=16),  # every long prompt is split over several steps
    dict(max_num_seqs=5),  # requests join the batch as others leave
], ids=["prefix-cache", "no-prefix-cache", "chunked-prefill", "seq-cap"])
def test_batched_equals_one_at_a_time(default_model_fp32, prompts, one_at_a_time, settings):
    got, core = run(default_model_fp32, prompts, **settings)
    assert got == one_at_a_time
    if "max_num_seqs" in settings:  # later arrivals find the shared prefix already cached
        assert core.scheduler.prefix_hit_tokens > 0
    if "max_num_batched_tokens" in settings:
        assert core.stats().steps > MAX_TOKENS + 5


def test_preemption_recomputes_without_changing_outputs(default_model_fp32, prompts, one_at_a_time):
    longest = max(len(p) for p in prompts) + MAX_TOKENS
    blocks = -(-longest // 16) + 6  # room for the longest sequence and little else
    got, core = run(default_model_fp32, prompts, num_kv_blocks=blocks, block_size=16)
    assert core.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == one_at_a_time


def test_prompt_that_cannot_fit_is_refused(default_model_fp32):
    from server.engine import InvalidRequestError
    core = EngineCore(default_model_fp32, EngineSettings(num_kv_blocks=4, block_size=16))
    with pytest.raises(InvalidRequestError, match="maximum context length is 64 tokens"):
        core.add_request("r", list(range(3, 80)), SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="60 prompt tokens \\+ max_tokens 10"):
        core.add_request("r", list(range(3, 63)), SamplingParams(max_tokens=10))
