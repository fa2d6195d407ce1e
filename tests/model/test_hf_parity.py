"""The decoder against Hugging Face transformers on the same weights: logits of a mixed prefill + chunked-prefill +
decode flat batch, and greedy token ids in float32.

Tolerances: float32 logits within 2e-4 absolute of HF's (same math; fused q/k/v and gate/up GEMMs and paged
attention reorder float sums, ~1e-5 typical); bfloat16 logits compared by top-1 agreement and a 0.5 mean absolute
logit difference, against HF in float32."""
import random

import pytest
import torch

from server.model import FlatBatch, KVCache
from tests.support.models import TINY_CONFIGS, hf_greedy, hf_model, load_fp32, loom_greedy, random_prompts

FP32_ATOL = 2e-4


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def mixed_batch_logits(lm, block_size: int, a: list[int], b: list[int], c: list[int], b_split: int) -> torch.Tensor:
    """Step 1 caches b[:b_split] and c[:-1]; step 2 runs a's whole prompt, b's second chunk and c's last token as
    one decode, all in one flat batch over shuffled (non-contiguous) physical blocks. Returns step 2's logits."""
    cfg = lm.config
    need = [-(-len(s) // block_size) for s in (a, b, c)]
    physical = list(range(sum(need) + 5))
    random.Random(block_size).shuffle(physical)
    tables, start = [], 0
    for n in need:
        tables.append(physical[start:start + n])
        start += n
    cache = KVCache.allocate(cfg.num_layers, len(physical), block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    with torch.no_grad():
        lm.model(FlatBatch.build([(b[:b_split], 0, tables[1]), (c[:-1], 0, tables[2])], [], block_size), cache)
        rows = list(range(len(a) + len(b) - b_split + 1))
        step2 = FlatBatch.build([(a, 0, tables[0]), (b[b_split:], b_split, tables[1])],
                                [(c[-1], len(c) - 1, tables[2])], block_size, logits_rows=rows)
        return lm.model.compute_logits(lm.model(step2, cache))


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_mixed_flat_batch_logits_match_hf(tiny_checkpoints, family, block_size):
    path = tiny_checkpoints[family]
    lm, hf = load_fp32(path), hf_model(path)
    a, b, c = random_prompts(3, 20, 50, seed=block_size)
    b_split = len(b) // 2 + 1
    ours = mixed_batch_logits(lm, block_size, a, b, c, b_split)
    expected = torch.cat([hf_logits(hf, a), hf_logits(hf, b)[b_split:], hf_logits(hf, c)[-1:]])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_tiny_greedy_matches_hf_fp32(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    lm, hf = load_fp32(path), hf_model(path)
    prompts = random_prompts(4, 3, 40, seed=1)
    ours = loom_greedy(lm, prompts, 64)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf, prompt, 64)


def test_default_model_mixed_batch_logits_match_hf(default_model_fp32, hf_default_fp32):
    tok = default_model_fp32.tokenizer
    a = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    b = tok.encode_chat([{"role": "user", "content": "Write a short poem about rivers and the sea, please."}])
    c = tok.encode("The quick brown fox jumps over the lazy dog because")
    ours = mixed_batch_logits(default_model_fp32, 16, a, b, c, 17)
    expected = torch.cat([hf_logits(hf_default_fp32, a), hf_logits(hf_default_fp32, b)[17:],
                          hf_logits(hf_default_fp32, c)[-1:]])
    torch.testing.assert_close(ours, expected, atol=FP32_ATOL, rtol=0)


DEFAULT_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                   "Explain what a hash table is.", "Give me three tips for better sleep.",
                   "Translate 'good morning' into Spanish."]


def test_default_model_greedy_matches_hf_fp32(default_model_fp32, hf_default_fp32):
    tok = default_model_fp32.tokenizer
    # three of the prompts: HF's unbatched generate costs ~2 s per prompt
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in DEFAULT_PROMPTS[:3]]
    ours = loom_greedy(default_model_fp32, prompts, 64, ignore_eos=False)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf_default_fp32, prompt, 64, set(tok.eos_token_ids))


def test_default_model_bf16_close_to_hf_fp32(default_checkpoint, hf_default_fp32):
    from server.model import ModelSettings, load_model
    lm = load_model(ModelSettings(model="default", dtype="bfloat16"), progress=False)
    tok = lm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": " ".join(DEFAULT_PROMPTS)}])
    cfg = lm.config
    cache = KVCache.allocate(cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    with torch.no_grad():
        batch = FlatBatch.build([(ids, 0, list(range(8)))], [], 16, logits_rows=list(range(len(ids))))
        ours = lm.model.compute_logits(lm.model(batch, cache))
    expected = hf_logits(hf_default_fp32, ids)
    agreement = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, f"bf16 top-1 agreement {agreement:.3f}"
    assert (ours - expected).abs().mean().item() < 0.5
