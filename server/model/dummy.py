"""`--model dummy:<preset|config.json>`: a decoder of a given shape with random weights, for benchmarks and tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

_SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True, "eos_token_id": 2}
DUMMY_PRESETS: dict[str, dict] = {
    "tiny": {**_SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
    "smollm2-135m": _SMOLLM2,
    "llama-1b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "rope_theta": 500000.0, "tie_word_embeddings": True, "eos_token_id": 2,
                 "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama-8b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                 "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 2},
    "qwen2-0.5b": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
                   "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "tie_word_embeddings": True, "eos_token_id": 2},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024, "eos_token_id": 2},
}


def dummy_config(target: str) -> dict:
    """The raw config of `dummy:<target>`: a preset name or a config.json path. Raises FileNotFoundError."""
    if target in DUMMY_PRESETS:
        return DUMMY_PRESETS[target]
    if Path(target).is_file():
        return json.loads(Path(target).read_text())
    raise FileNotFoundError(f"dummy model {target!r} is neither a preset ({', '.join(DUMMY_PRESETS)}) "
                            f"nor a config.json file")


def fill_random(model: nn.Module, seed: int) -> None:
    """Small random matrices keep activations finite in deep stacks; norm scales one, biases zero."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        else:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
