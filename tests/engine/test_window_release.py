"""Sliding windows free their blocks. The scheduler over a windowed pool (hypothesis): budgets, reference counts and
preemption stay right and every block comes back. On a tiny random Mistral-style model (every layer windowed) a
running sequence gives back the blocks that slid out of the window after each step, holds only about the window's
blocks while it decodes, and generates exactly the greedy tokens of the same run that keeps every block, with every
free block overwritten after each step (a block released while still read would change the output): chunked prefill,
speculative verification, preemption and recompute, each kernel path. A model with a global layer keeps that layer's
blocks and releases its windowed layers' (a KV group each)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.block_manager import BlockManager
from server.engine.engine_core import attention_horizon
from server.engine.hybrid_block_manager import HybridBlockManager
from server.engine.offline import generate
from server.engine.scheduler import Scheduler
from server.model import LoadedModel, ModelConfig, ModelSettings, load_model
from server.model.dummy import DUMMY_PRESETS
from tests.support.models import compute_scheduled, make_seq

WINDOW, BLOCK = 20, 8  # a window that is no multiple of the block size
GREEDY = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
POISON = 1e3  # K/V far outside a real cache's range: one read of it as a visible key changes the output


def dummy(tmp_path_factory, name: str, **config) -> LoadedModel:
    """A dummy decoder scaled up from the dummy's near-zero weights, so its greedy output wanders, then loops."""
    path = tmp_path_factory.mktemp(name) / "config.json"
    path.write_text(json.dumps({**DUMMY_PRESETS["tiny"], "vocab_size": 512, "tie_word_embeddings": False, **config}))
    lm = load_model(ModelSettings(model=f"dummy:{path}", dtype="float32"), progress=False)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return lm


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return dummy(tmp_path_factory, "mistral", architectures=["MistralForCausalLM"], sliding_window=WINDOW)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    lengths = (5, 19, 37, 52, 12, 29)  # within the window, across it, past it and past the prefill chunk
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def engine(lm, **settings) -> EngineCore:
    return EngineCore(lm, EngineSettings(**{"block_size": BLOCK, "max_num_batched_tokens": 32,
                                            "speculative": "none", "kv_cache_memory": 0.001, **settings}))


def poison_free_blocks(core: EngineCore) -> None:
    """Overwrite the K/V of every free block that holds no cached prefix (without prefix caching: every free block),
    as their next owner would: a block the engine released too early is then read as garbage."""
    bm, cache = getattr(core.block_manager, "pool", core.block_manager), core.runner.kv_cache  # a hybrid's one pool
    free = torch.tensor(bm.plain + bm.fresh, dtype=torch.long)
    for k, v in zip(cache.k, cache.v):
        k[free] = POISON
        v[free] = POISON


def run(core: EngineCore, prompts, params=GREEDY) -> list[list[int]]:
    results = generate(core, prompts, params, on_step=lambda: poison_free_blocks(core))
    bm = getattr(core.block_manager, "pool", core.block_manager)
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not core.scheduler.running and not core.scheduler.waiting
    return [r[0].token_ids for r in results]


@pytest.fixture(scope="module")
def kept(mistral, prompts):
    """The reference: the same engine with releasing turned off (every block held to the end)."""
    core = engine(mistral)
    core.block_manager.window = None
    return run(core, prompts)


def check_references(bm: BlockManager, running) -> None:
    """Each block is referenced exactly by the running sequences that hold it unreleased; free ones by none."""
    owners: dict[int, int] = {}
    for seq in running:
        for b in seq.block_table[seq.num_released_blocks:]:
            owners[b] = owners.get(b, 0) + 1
    assert all(block.ref_count == owners.get(block.block_id, 0) for block in bm.blocks)
    assert bm.num_free_blocks == sum(1 for block in bm.blocks if block.ref_count == 0)


def simulate(requests, num_blocks: int, max_seqs: int, budget: int, window: int, caching: bool) -> Scheduler:
    """The scheduler over a windowed pool, with the engine's release after every step; checks budgets, each step's
    blocks and every reference count, and that every sequence finishes and every block comes back."""
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=caching, window=window)
    sched = Scheduler(bm, max_seqs, budget)
    for i, (prompt, max_new) in enumerate(requests):
        seq = make_seq(prompt, i)
        seq.max_tokens = max_new
        sched.add(seq)
    for _ in range(3000):
        if not sched.has_work:
            break
        out = sched.schedule()
        assert out.num_tokens <= budget
        compute_scheduled(sched, out, 4)
        for seq in sched.running:
            bm.release_behind_window(seq)
            assert seq.num_released_blocks * 4 <= max(seq.num_computed_tokens + 1 - window, 0)
        check_references(bm, sched.running)
    assert not sched.has_work, "scheduler made no progress"
    assert bm.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    return sched


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 12)),
                         min_size=1, max_size=12),
       num_blocks=st.integers(11, 30), max_seqs=st.integers(1, 6), budget=st.integers(1, 40), window=st.integers(1, 9),
       caching=st.booleans())
def test_scheduler_with_windows_runs_everything_and_returns_every_block(requests, num_blocks, max_seqs, budget,
                                                                         window, caching):
    """Shared prefixes, chunked prompts, releases; each request fits the pool on its own (<= 42 tokens: 11 blocks)."""
    simulate(requests, num_blocks, max_seqs, budget, window, caching)


@pytest.mark.parametrize("caching", [True, False])
def test_a_tight_windowed_pool_preempts_and_recomputes(caching):
    sched = simulate([([i] * 12, 30) for i in range(6)], 11, 6, 64, 8, caching)
    assert sched.num_preemptions > 0


def test_horizon_is_the_window_only_when_every_layer_slides():
    base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_hidden_layers": 4}

    def horizon(**raw) -> int | None:
        return attention_horizon(ModelConfig.from_dict({**base, **raw}))
    assert horizon(architectures=["MistralForCausalLM"], sliding_window=24) == 24
    assert horizon(architectures=["MistralForCausalLM"], sliding_window=None) is None
    assert horizon(architectures=["Phi3ForCausalLM"], sliding_window=48) == 48
    assert horizon(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=24,
                   max_window_layers=1) is None  # layer 0 is global
    assert horizon(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=24,
                   max_window_layers=0) == 24
    assert horizon(architectures=["Gemma3ForCausalLM"], sliding_window=16, sliding_window_pattern=2) is None
    assert horizon(architectures=["SmolLM3ForCausalLM"], use_sliding_window=True, sliding_window=24) is None
    assert horizon(architectures=["LlamaForCausalLM"]) is None


@pytest.mark.parametrize("settings", [
    dict(enable_prefix_caching=False),  # released blocks go where the next allocation takes first
    dict(),  # released blocks keep their prefixes on the free list
    dict(speculative="ngram", ngram_min=1, ngram_max=3, enable_prefix_caching=False),  # several positions a step
    dict(num_kv_blocks=17, enable_prefix_caching=False),  # preemption and recompute even with windows
], ids=["plain", "prefix-cache", "speculative", "preemption"])
def test_greedy_output_is_that_of_the_run_that_keeps_every_block(mistral, prompts, kept, settings):
    core = engine(mistral, **settings)
    released = []
    core.runner.run = counting_releases(core, released)
    assert run(core, prompts) == kept
    assert max(released) > 0, "no block was released"
    if "speculative" in settings:
        assert 0 < core.speculator.accepted < core.speculator.drafted
    if "num_kv_blocks" in settings:
        assert core.scheduler.num_preemptions > 0


def counting_releases(core: EngineCore, released: list[int]):
    """Wrap the model runner: record, at each step, how many blocks the running sequences have released."""
    original = core.runner.run

    def wrapped(sched):
        released.append(sum(s.num_released_blocks for s in core.scheduler.running))
        return original(sched)
    return wrapped


@pytest.mark.parametrize("caching", [True, False])
def test_a_long_generation_holds_only_the_window(mistral, prompts, caching):
    """One sequence generating far past the window: while it decodes it holds at most ceil(window / block) + 2
    blocks, measured while the model runs (after the step's allocation, before the release)."""
    core = engine(mistral, enable_prefix_caching=caching)
    bm, held = core.block_manager, []
    original = core.runner.run

    def measuring(sched):
        if not sched.prefills:
            held.append(bm.num_blocks - bm.num_free_blocks)
        return original(sched)
    core.runner.run = measuring
    out = run(core, [prompts[3]], SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
    assert len(out[0]) == 150 and len(held) >= 149
    assert max(held) <= -(-WINDOW // BLOCK) + 2
    assert bm.num_blocks > -(-(52 + 150) // BLOCK)  # the pool could have held it all: releasing was not forced


def test_a_model_with_a_global_layer_releases_only_its_windowed_groups_pages(tmp_path_factory, prompts):
    """Qwen2 with a window from layer 1 on: layer 0 reads the whole context, so its KV group keeps every block to the
    end, while layer 1's group (server/model/kv_layout.py) gives back what slid out of the window into the pool both
    draw from. With every free page poisoned after each step, the tokens of the run that keeps every page."""
    lm = dummy(tmp_path_factory, "qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
               sliding_window=WINDOW, max_window_layers=1)
    core = engine(lm, enable_prefix_caching=False)
    bm = core.block_manager
    assert isinstance(bm, HybridBlockManager) and bm.pool.window is None and bm.groups[1].window == WINDOW
    full, local = [], []

    def check() -> None:
        poison_free_blocks(core)
        for seq in core.scheduler.running:
            assert seq.num_released_blocks == 0
            full.append(len(seq.block_table) == bm.pool.blocks_needed(seq.num_computed_tokens))
            (window_table,) = seq.group_tables
            local.append(len(window_table.block_table) - window_table.num_released_blocks)
    results = generate(core, prompts, GREEDY, on_step=check)
    assert all(full) and all(len(r[0].token_ids) == 80 for r in results)
    assert max(local) <= -(-(WINDOW + 32) // BLOCK) + 2  # a window, the step's chunk, the partial ends
    assert bm.num_free_blocks == bm.num_blocks
    keep = engine(lm, enable_prefix_caching=False)
    keep.block_manager.groups[1].window = None
    assert [r[0].token_ids for r in results] == run(keep, prompts)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_every_kernel_path_sees_only_the_window(mistral, prompts, kernel_env, kernels):
    """The PyTorch references (their decode gathers a table's blocks, then masks) and the Triton kernels (the
    interpreter here), decode and chunked prefill past the window: with every free block poisoned, the tokens of the
    run that keeps every block."""
    kernel_env(kernels)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    short = [prompts[1], prompts[3]]  # 19 and 52 tokens: one prefills in two chunks, both decode past the window
    keep = engine(mistral, enable_prefix_caching=False)
    keep.block_manager.window = None
    assert run(engine(mistral, enable_prefix_caching=False), short, params) == run(keep, short, params)
