"""The default KV pool is sized from the model: `max_num_seqs` full contexts at the model's bytes per token, capped by
a fraction of the memory the process may use; explicit settings win; the CPU pool's pages are only committed once
written; its element type follows the model's, float16 for quantized models computing in float32 on CPU."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from server.engine import EngineCore, EngineSettings, model_runner
from server.engine.model_runner import kv_cache_dtype, size_kv_cache
from server.model.batch import KVCache, lazy_zeros


def per_token(lm) -> int:
    c = lm.config
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * torch.empty((), dtype=lm.dtype).element_size()


def test_default_pool_holds_max_num_seqs_full_contexts(dummy_lm, monkeypatch):
    monkeypatch.setattr(model_runner, "memory_limit_bytes", lambda: 64 * 2 ** 30)
    s = size_kv_cache(dummy_lm, EngineSettings(max_num_seqs=8, block_size=16), max_model_len=500)
    assert s.blocks == 8 * 32 and s.reason == "max_num_seqs x max_model_len"
    assert s.bytes_per_block == 16 * per_token(dummy_lm)


def test_default_pool_is_capped_by_the_memory_fraction(dummy_lm, monkeypatch):
    monkeypatch.setattr(model_runner, "memory_limit_bytes", lambda: 2 ** 30)
    s = size_kv_cache(dummy_lm, EngineSettings(max_num_seqs=4096, kv_cache_memory_fraction=0.05), 2048)
    assert s.reason == "kv_cache_memory_fraction of memory"
    assert s.blocks * s.bytes_per_block <= 0.05 * 2 ** 30 < (s.blocks + 1) * s.bytes_per_block
    assert s.wanted_blocks == 4096 * 128


def test_explicit_settings_win(dummy_lm):
    assert size_kv_cache(dummy_lm, EngineSettings(num_kv_blocks=77), 512).blocks == 77
    s = size_kv_cache(dummy_lm, EngineSettings(kv_cache_memory=0.01), 512)
    assert s.reason == "kv_cache_memory" and s.blocks == int(0.01 * 2 ** 30 // s.bytes_per_block)


def test_the_log_says_what_it_took_and_why(dummy_lm, caplog):
    with caplog.at_level(logging.INFO, logger="loom.engine"):
        core = EngineCore(dummy_lm, EngineSettings(max_num_seqs=2, max_model_len=256))
    rec = next(r for r in caplog.records if r.getMessage() == "kv cache allocated")
    assert rec.blocks == core.block_manager.num_blocks == 2 * 16
    assert rec.reason == "max_num_seqs x max_model_len" and rec.bytes_per_token == per_token(dummy_lm)
    assert rec.mib > 0


def test_cpu_pool_is_zero_and_committed_lazily():
    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

    before = rss()
    cache = KVCache.allocate(8, 4096, 16, 8, 64, torch.bfloat16)  # 1 GiB
    assert rss() - before < 64 * 2 ** 20, "the pool's pages are not touched at allocation"
    assert cache.k[0].data_ptr() % 64 == 0 and not cache.k[3][100].any() and not cache.v[7][-1].any()
    t = lazy_zeros((3, 5), torch.float32)
    assert t.shape == (3, 5) and not t.any()


def computed(bm, seq) -> None:
    """As after the step that ran `seq`'s prompt: its full blocks registered in the prefix cache."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_cpu_pool_touches_fresh_blocks_only_for_in_use_and_retained_prefixes():
    """Resident memory follows the most blocks in use at once plus the share kept for freed prefixes: 50 requests of
    3 cached blocks one after another touch 200 / 4 = 50 blocks, not 150; blocks holding no prefix are reused before
    any fresh one; the whole pool is still there when needed."""
    from server.engine.block_manager import BlockManager
    from tests.support.models import make_seq

    bm = BlockManager(num_blocks=200, block_size=4, touch_fresh_last=True)
    touched = set()
    for i in range(50):
        seq = make_seq(list(range(i * 100, i * 100 + 12)), seq_id=i)
        assert bm.allocate(seq, 12)
        touched |= set(seq.block_table)
        computed(bm, seq)
        bm.free_sequence(seq)
    assert len(touched) == 50 and bm.num_free_blocks == 200 and bm.usage == 0.0
    for i in range(20):  # 11 tokens: two cached blocks and a partial one, reused by the next request
        seq = make_seq(list(range(10_000 + i * 100, 10_000 + i * 100 + 11)), seq_id=200 + i)
        assert bm.allocate(seq, 11)
        touched |= set(seq.block_table)
        computed(bm, seq)
        bm.free_sequence(seq)
    assert len(touched) == 50
    held = [make_seq(list(range(1000 * j, 1000 * j + 40)), seq_id=100 + j) for j in range(20)]
    assert all(bm.allocate(s, 40) for s in held)
    assert bm.num_free_blocks == 0 and not bm.allocate(make_seq([1, 2, 3], seq_id=999), 3)


def test_cpu_pool_keeps_a_freed_prefix_while_other_requests_pass():
    """A chat's earlier turn stays cached while other requests run in between, until the pool has touched its
    retained share (a quarter: 50 blocks) and the least recently freed prefix goes first."""
    from server.engine.block_manager import BlockManager
    from tests.support.models import make_seq

    bm = BlockManager(num_blocks=200, block_size=4, touch_fresh_last=True)
    first = make_seq(list(range(40)), seq_id=0)
    assert bm.allocate(first, 40)
    computed(bm, first)
    bm.free_sequence(first)
    for i in range(3):
        other = make_seq(list(range(1000 * (i + 1), 1000 * (i + 1) + 40)), seq_id=1 + i)
        assert bm.allocate(other, 40)
        computed(bm, other)
        bm.free_sequence(other)
    again = make_seq(list(range(40)) + [7, 7], seq_id=9)
    assert len(bm.match_prefix(again)) == 10
    for i in range(2):  # 60 blocks touched: the oldest prefix is evicted before a fresh block is touched
        other = make_seq(list(range(5000 * (i + 1), 5000 * (i + 1) + 40)), seq_id=20 + i)
        assert bm.allocate(other, 40)
        computed(bm, other)
        bm.free_sequence(other)
    assert bm.match_prefix(again) == [] and bm.num_blocks - len(bm.fresh) == 50


def test_cpu_step_budget_defaults_to_1024_and_an_explicit_one_wins(dummy_lm):
    """Issue 14's soak: a CPU step's RSS peak grows with its tokens, so the CPU default step is 1,024 tokens."""
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=64))
    assert core.settings.max_num_batched_tokens == 1024 == core.scheduler.max_num_batched_tokens
    assert core.scheduler.max_prefill_chunk == 256
    core = EngineCore(dummy_lm, EngineSettings(num_kv_blocks=64, max_num_batched_tokens=3000))
    assert core.scheduler.max_num_batched_tokens == 3000


def test_kv_dtype_auto_narrows_only_quantized_float32_models_on_cpu(dummy_lm):
    """float16 K/V for quantized weights computing in float32 on CPU (what a CPU without bf16 runs); the model's
    dtype otherwise: a float32 model unquantized keeps exact K/V, bf16 activations keep bf16."""
    f32 = dataclasses.replace(dummy_lm, dtype=torch.float32)
    assert kv_cache_dtype(dataclasses.replace(f32, quantization="gguf")) == torch.float16
    assert kv_cache_dtype(dataclasses.replace(f32, quantization="q4")) == torch.float16
    assert kv_cache_dtype(dataclasses.replace(f32, quantization="none")) == torch.float32
    assert kv_cache_dtype(dataclasses.replace(f32, quantization="gguf", dtype=torch.bfloat16)) == torch.bfloat16
    assert kv_cache_dtype(dataclasses.replace(f32, quantization="gguf"), "float32") == torch.float32
    assert kv_cache_dtype(f32, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="--kv-cache-dtype float16 under bfloat16 activations"):
        kv_cache_dtype(dataclasses.replace(f32, dtype=torch.bfloat16), "float16")


def test_a_float16_cache_holds_twice_the_tokens_in_the_same_memory(dummy_lm, caplog):
    lm = dataclasses.replace(dummy_lm, dtype=torch.float32, quantization="q8")
    wide = size_kv_cache(lm, EngineSettings(kv_cache_memory=0.01, kv_cache_dtype="float32"), 512)
    narrow = size_kv_cache(lm, EngineSettings(kv_cache_memory=0.01), 512)
    assert wide.bytes_per_block == 2 * narrow.bytes_per_block
    assert narrow.blocks in (2 * wide.blocks, 2 * wide.blocks + 1)
    with caplog.at_level(logging.INFO, logger="loom.engine"):
        core = EngineCore(dummy_lm, EngineSettings(max_num_seqs=2, max_model_len=256, kv_cache_dtype="bfloat16"))
    rec = next(r for r in caplog.records if r.getMessage() == "kv cache allocated")
    assert rec.dtype == "bfloat16" and core.runner.kv_cache.k[0].dtype == torch.bfloat16


def test_a_kv_dtype_the_activations_cannot_take_ends_the_start_before_loading():
    """`--kv-cache-dtype float16` under bf16 activations: refused at once (the model path is not even looked at)."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "/nonexistent/model.gguf", "--dtype", "bfloat16",
           "--kv-cache-dtype", "float16", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error: --kv-cache-dtype float16 under bfloat16 activations" in done.stderr, done.stderr[-2000:]
