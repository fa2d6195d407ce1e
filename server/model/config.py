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
    "Qwen3ForCausalLM": "qwen3",
    "SmolLM3ForCausalLM": "smollm3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
}
# config.json `model_type` -> architecture, for configs that do not name one
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
# Rotary base when a config leaves it out, where transformers' default is not 10000 (Gemma 3: global layers).
DEFAULT_THETA = {"smollm3": 2_000_000.0, "gemma3": 1_000_000.0}
# Gated-MLP activation each family accepts (`hidden_act`, Gemma's `hidden_activation`).
ACTIVATIONS = {"gemma3": "gelu_pytorch_tanh"}
TIED_BY_DEFAULT = {"smollm3", "gemma3"}  # transformers' `tie_word_embeddings` default is True for these


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or settings are not ones Loom can run."""


@dataclass
class ModelConfig:
    architecture: str  # Hugging Face name, e.g. "LlamaForCausalLM"
    family: str  # a key of server/model/families.py: "llama", "qwen3", "smollm3", "phi3", "gemma3" or "gpt2"
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
    # Per layer "sliding_attention" or "full_attention", for the families whose attention runs the window itself
    # (Qwen3, SmolLM3, Phi-3, Gemma 3). None: the family does not (Llama/Mistral/Qwen2), see `max_model_len`.
    layer_types: list[str] | None = None
    no_rope_layers: list[int] | None = None  # SmolLM3: 0 marks a layer without rotary (NoPE)
    partial_rotary_factor: float = 1.0  # Phi-3/4: rotary on the first `rotary_dim` features of each head only
    rope_local_theta: float | None = None  # Gemma 3: rotary base of the sliding-window layers
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its -1/2 power instead of head_dim's
    final_logit_softcapping: float | None = None  # Gemma: logits = cap * tanh(logits / cap)

    @property
    def max_model_len(self) -> int:
        """Longest context Loom serves: every family runs its sliding windows, so the whole context (a config
        without layer types keeps inside its window)."""
        if self.sliding_window and self.layer_types is None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def rotary_dim(self) -> int:
        """Features of each head that rotate (transformers: `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`: how many positions back (its own included) a query sees; None for
        full attention."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        arch = architecture(raw)
        family = ARCHITECTURES[arch]
        eos = raw.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        common = dict(architecture=arch, family=family, vocab_size=raw["vocab_size"], eos_token_ids=eos_ids,
                      bos_token_id=raw.get("bos_token_id"), torch_dtype=raw.get("torch_dtype") or raw.get("dtype"))
        if family == "gpt2":
            return cls(**common, **gpt2_fields(raw))
        return cls(**common, **decoder_fields(raw, arch, family))

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def architecture(raw: dict[str, Any]) -> str:
    """The Hugging Face architecture Loom runs the checkpoint as; UnsupportedModelError if none."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None) or MODEL_TYPES.get(raw.get("model_type", ""))
    if arch is None and "Gemma3ForConditionalGeneration" in archs:
        raise UnsupportedModelError("Gemma 3 image-text checkpoints (Gemma3ForConditionalGeneration) are not "
                                    "supported; Loom runs the text-only ones (Gemma3ForCausalLM, gemma3_text)")
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or raw.get('model_type')!r}; Loom runs "
            f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def gpt2_fields(raw: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = raw["n_embd"], raw["n_head"]
    return dict(hidden_size=hidden, num_layers=raw["n_layer"], num_heads=heads, num_kv_heads=heads,
                head_dim=hidden // heads, intermediate_size=raw.get("n_inner") or 4 * hidden,
                max_position_embeddings=raw["n_positions"], norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=raw.get("tie_word_embeddings", True), attention_bias=True,
                activation=raw.get("activation_function", "gelu_new"))


def decoder_fields(raw: dict[str, Any], arch: str, family: str) -> dict[str, Any]:
    """The fields of a Llama-like decoder (every family but GPT-2)."""
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or ACTIVATIONS.get(family, "silu")
    if activation != ACTIVATIONS.get(family, "silu"):
        raise UnsupportedModelError(f"unsupported activation {activation!r} for {arch} "
                                    f"(Loom has {ACTIVATIONS.get(family, 'silu')})")
    return dict(hidden_size=hidden, num_layers=raw["num_hidden_layers"], num_heads=heads,
                num_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=raw.get("head_dim") or hidden // heads,
                intermediate_size=raw["intermediate_size"],
                max_position_embeddings=raw.get("max_position_embeddings", 2048),
                norm_eps=raw.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=raw.get("tie_word_embeddings", family in TIED_BY_DEFAULT),
                attention_bias=raw.get("attention_bias", arch == "Qwen2ForCausalLM"), activation=activation,
                **rope_fields(raw, family), **window_fields(raw, arch, family), **family_fields(raw, family))


def rope_fields(raw: dict[str, Any], family: str) -> dict[str, Any]:
    """Rotary base, scaling and partial rotary. transformers >= 5 writes `rope_parameters` (with the base inside),
    older configs `rope_theta` and `rope_scaling`; Gemma 3 has one set per layer type."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    out: dict[str, Any] = {}
    if family == "gemma3":
        params, out["rope_local_theta"] = gemma3_rope(raw, params)
    theta = params.pop("rope_theta", None) or raw.get("rope_theta") or DEFAULT_THETA.get(family, 10000.0)
    out["partial_rotary_factor"] = float(params.pop("partial_rotary_factor", None)
                                         or raw.get("partial_rotary_factor") or 1.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if family == "phi3" and kind in ("su", "yarn"):  # Phi-3's early names for LongRoPE (transformers maps them too)
        kind = "longrope"
    if kind not in ("default", "llama3", "linear", "longrope", "factors") or (kind == "longrope" and family != "phi3"):
        raise UnsupportedModelError(f"unsupported rope scaling type {kind!r} (Loom has default, linear, llama3, "
                                    f"per-frequency factors, and longrope for Phi-3)")
    if family == "llama" and out["partial_rotary_factor"] != 1.0:
        raise UnsupportedModelError("partial rotary (partial_rotary_factor) is not supported for " + family)
    if kind == "longrope":
        params = longrope_parameters(raw, params)
    out.update(rope_theta=float(theta), rope_scaling={**params, "rope_type": kind} if kind != "default" else None)
    return out


def gemma3_rope(raw: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """(the global layers' rotary parameters, the local layers' base). Scaling applies to the global layers only."""
    if "full_attention" in params or "sliding_attention" in params:  # nested by layer type (transformers >= 5)
        local = params.get("sliding_attention") or {}
        if (local.get("rope_type") or "default") != "default":
            raise UnsupportedModelError(f"unsupported rope scaling {local['rope_type']!r} on Gemma 3's local layers")
        return dict(params.get("full_attention") or {}), float(local.get("rope_theta") or 10000.0)
    return params, float(raw.get("rope_local_base_freq") or 10000.0)


def longrope_parameters(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE: both factor lists, the pretraining length (the top-level key wins, as in transformers),
    and the optional explicit `factor` / `attention_factor` (rope.py derives them otherwise)."""
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or raw.get("max_position_embeddings", 2048)
    kept = {k: params[k] for k in ("factor", "attention_factor") if params.get(k) is not None}
    return dict(short_factor=list(params["short_factor"]), long_factor=list(params["long_factor"]),
                original_max_position_embeddings=int(original), **kept)


def window_fields(raw: dict[str, Any], arch: str, family: str) -> dict[str, Any]:
    """The sliding window and, for the families that run it, which layers use it (transformers' rules)."""
    n = raw["num_hidden_layers"]
    if family == "llama":  # Mistral: every layer slides; Qwen2 (use_sliding_window): layers from max_window_layers
        mistral = arch == "MistralForCausalLM"
        window = raw.get("sliding_window") if raw.get("use_sliding_window", mistral) else None
        first = 0 if mistral else raw.get("max_window_layers", 28)
        types = raw.get("layer_types") or ["sliding_attention" if window and i >= first else "full_attention"
                                            for i in range(n)]
        return dict(sliding_window=window, layer_types=list(types))
    if family in ("qwen3", "smollm3") and not raw.get("use_sliding_window"):
        return dict(sliding_window=None, layer_types=["full_attention"] * n)
    window = raw.get("sliding_window", 4096 if family == "gemma3" else None)  # transformers' default for Gemma 3
    types = raw.get("layer_types")
    if types is None and family == "phi3":  # every layer, when the config sets a window
        types = ["sliding_attention" if window else "full_attention"] * n
    elif types is None and family == "gemma3":  # every `pattern`-th layer global, the others local
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif types is None and family == "qwen3":  # layers from max_window_layers on slide
        types = ["sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    elif types is None:  # SmolLM3: the NoPE layers slide
        types = ["full_attention" if rope else "sliding_attention" for rope in no_rope_layers(raw)]
    if window is None:
        types = ["full_attention"] * n
    return dict(sliding_window=window, layer_types=list(types))


def no_rope_layers(raw: dict[str, Any]) -> list[int]:
    """SmolLM3's rotary flags per layer: given, or every `no_rope_layer_interval`-th layer without (transformers)."""
    given = raw.get("no_rope_layers")
    if given is not None:
        return list(given)
    interval = raw.get("no_rope_layer_interval", 4)
    return [int((i + 1) % interval != 0) for i in range(raw["num_hidden_layers"])]


def family_fields(raw: dict[str, Any], family: str) -> dict[str, Any]:
    """What only one family has: SmolLM3's NoPE layers, Gemma 3's attention scale and logit capping."""
    if family == "smollm3":
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("MLP biases (mlp_bias) are not supported")
        return dict(no_rope_layers=no_rope_layers(raw))
    if family != "gemma3":
        return {}
    if raw.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("attention logit soft-capping (attn_logit_softcapping) is not supported")
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional Gemma 3 attention (an embedding model) is not supported")
    return dict(query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256),
                final_logit_softcapping=raw.get("final_logit_softcapping"))
