"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) as plain modules over a flat batch and a paged KV cache.

q/k/v and gate/up projections are fused into one matmul each (fewer, larger GEMMs); `load_weights` packs the
Hugging Face tensors into them. Module names mirror Hugging Face so checkpoints map one to one.
"""
from collections.abc import Iterable

import torch
from torch import nn

from loom_kernels import rms_norm, rotary, silu_and_mul
from server.model.attention import PagedAttention
from server.model.batch import FlatBatch, KVCache
from server.model.config import ModelConfig
from server.model.rope import cos_sin_cache
from server.model.weights.cpu_stack import DecodeStacks, wants_stack
from server.model.weights.head import float_logits


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim ** -0.5,
                                   cfg.layer_window(layer))

    def forward(self, x: torch.Tensor, batch: FlatBatch, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        rotary(q, k, batch.positions, cos_sin)
        return self.o_proj(self.attn(q, k, v, batch, k_cache, v_cache))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: FlatBatch, cos_sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, cos_sin, k_cache, v_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    # Hugging Face name fragment -> (fused Loom parameter, index of the shard inside it)
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        self.decode_stacks: DecodeStacks | None = None
        self.post_init()

    def post_init(self) -> None:
        """Tie the head and compute the rotary table (float32) on the weights' device; the loader calls this again
        after `to_empty`, which unties parameters and leaves buffers uninitialised."""
        c = self.config
        if c.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # quantized heads carry their own codes
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.norm.weight.device
        if device.type != "meta":  # built on meta first; the loader calls this again once weights have a device
            self.cos_sin = cos_sin_cache(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                         c.rope_scaling).to(device)

    def enable_decode_stack(self, kv_cache: KVCache) -> bool:
        """Run decode-only steps on `kv_cache` through the one-call C++ stack where it applies (cpu_stack.py)."""
        self.decode_stacks = DecodeStacks(self, kv_cache) if wants_stack(self, kv_cache) else None
        return self.decode_stacks is not None

    def forward(self, batch: FlatBatch, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm."""
        x = self.model.embed_tokens(batch.input_ids)
        if self.decode_stacks is not None and self.decode_stacks.takes(batch, kv_cache):
            return self.decode_stacks.run(x, batch)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, batch, self.cos_sin, kv_cache.k[i], kv_cache.v[i])
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return float_logits(self.lm_head, hidden)

    def shard_sizes(self, fused: str) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face tensors into this model; returns the names of the parameters that were filled."""
        params = dict(self.named_parameters())
        filled = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            for part, (fused, shard) in self.packed.items():
                if f".{part}." in name:
                    target = name.replace(part, fused)
                    sizes = self.shard_sizes(fused)
                    start = sum(sizes[:shard])
                    params[target].narrow(0, start, sizes[shard]).copy_(tensor)
                    filled.add(f"{target}#{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                params[name].copy_(tensor)
                filled.add(name)
        return filled

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
            if fused:
                names.update(f"{name}#{i}" for i in range(len(self.shard_sizes(fused))))
            else:
                names.add(name)
        return names
