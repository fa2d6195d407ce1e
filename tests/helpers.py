"""Small helpers shared by tests."""
from __future__ import annotations

import random

import torch

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import ModelSettings, load_model


def load_fp32(path) -> object:
    return load_model(ModelSettings(model=str(path), dtype="float32"), progress=False)


def hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # tests decide when to stop
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False)[0, len(prompt):].tolist()
    for i, tok in enumerate(out):
        if tok in eos:
            return out[:i + 1]
    return out


def loom_greedy(lm, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = True,
                **engine_kwargs) -> list[list[int]]:
    core = EngineCore(lm, EngineSettings(**{"kv_cache_memory": 0.25, **engine_kwargs}))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=ignore_eos)
    results = generate(core, prompts, params)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"
    return [r[0].token_ids for r in results]


def random_prompts(n: int, lo: int, hi: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
