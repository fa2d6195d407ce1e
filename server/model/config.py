"""Model architecture description parsed from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Hugging Face architecture name -> Loom decoder family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or settings are not ones Loom can run."""


@dataclass
class ModelConfig:
    architecture: str  # Hugging Face name, e.g. "LlamaForCausalLM"
    family: str  # "llama" or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v (Qwen2, GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    activation: str = "silu"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def max_model_len(self) -> int:
        """Longest context Loom serves: sliding-window attention is not implemented, so stay inside the window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gpt2": "GPT2LMHeadModel"}.get(raw.get("model_type", ""))
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; Loom runs "
                f"{', '.join(sorted(ARCHITECTURES))}")
        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        common = dict(architecture=arch, family=ARCHITECTURES[arch], vocab_size=raw["vocab_size"],
                      eos_token_ids=eos_ids, bos_token_id=raw.get("bos_token_id"),
                      torch_dtype=raw.get("torch_dtype") or raw.get("dtype"))
        if ARCHITECTURES[arch] == "gpt2":
            hidden = raw["n_embd"]
            heads = raw["n_head"]
            return cls(**common, hidden_size=hidden, num_layers=raw["n_layer"], num_heads=heads, num_kv_heads=heads,
                       head_dim=hidden // heads, intermediate_size=raw.get("n_inner") or 4 * hidden,
                       max_position_embeddings=raw["n_positions"], norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=raw.get("tie_word_embeddings", True), attention_bias=True,
                       activation=raw.get("activation_function", "gelu_new"))
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r} (Loom has default, linear, llama3)")
        window = raw.get("sliding_window") if raw.get("use_sliding_window", arch == "MistralForCausalLM") else None
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported activation {raw.get('hidden_act')!r} (Loom has silu)")
        return cls(**common, hidden_size=hidden, num_layers=raw["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=raw.get("num_key_value_heads") or heads,
                   head_dim=raw.get("head_dim") or hidden // heads, intermediate_size=raw["intermediate_size"],
                   max_position_embeddings=raw.get("max_position_embeddings", 2048),
                   norm_eps=raw.get("rms_norm_eps", 1e-6), tie_word_embeddings=raw.get("tie_word_embeddings", False),
                   attention_bias=raw.get("attention_bias", arch == "Qwen2ForCausalLM"), rope_theta=float(rope_theta),
                   rope_scaling=rope if rope_type != "default" else None, sliding_window=window)

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
