"""Models for tests: tiny random checkpoint configs, Hugging Face references, greedy runs through Loom's engine, random
prompts, and bare engine sequences."""
from __future__ import annotations

import random

import torch

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.engine.sequence import Sequence
from server.model import ModelSettings, load_model

TINY_CONFIGS = {
    "llama": dict(cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-rope": dict(cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                    sliding_window=None),
    "gpt2": dict(cls="GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


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


def make_seq(tokens: list[int], seq_id: int = 0, **params) -> Sequence:
    """A bare sequence for scheduler and block-manager tests (max_tokens 16)."""
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams(**params), 16)


def compute_scheduled(sched, out, block_size: int) -> list[Sequence]:
    """What a model step does to the bookkeeping of `out` (a SchedulerOutput): each scheduled sequence's blocks cover
    its new tokens, they are computed, full blocks go into the prefix cache, a completed prompt or decode samples
    token 7, and one that reached its max_tokens is finished ("length"). Returns those finished sequences."""
    finished = []
    for item in out.prefills + out.decodes:
        seq = item.seq
        assert len(seq.block_table) * block_size >= seq.num_computed_tokens + item.num_new_tokens
        completes = item.completes_prompt
        seq.num_computed_tokens += item.num_new_tokens
        sched.block_manager.cache_full_blocks(seq)
        if completes:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")
                finished.append(seq)
    return finished
