"""Gemma 3 (text): local sliding-window layers interleaved with global ones, over a flat batch and a paged KV cache.

Against Llama: RMSNorms scale by `1 + w` in float32 (Gemma stores the offset from one) and wrap both sublayers on
both sides (`input_layernorm` / `post_attention_layernorm` around attention, `pre_feedforward_layernorm` /
`post_feedforward_layernorm` around the MLP); q and k get a per-head norm before rotary; the MLP is GeGLU with the
tanh GELU; embeddings are scaled by sqrt(hidden) (rounded to the model dtype first, as transformers does); attention
scales by `query_pre_attn_scalar ** -0.5`; logits may be soft-capped. Local layers (`layer_types`) see the last
`sliding_window` positions and rotate with their own base (`rope_local_base_freq`, no scaling); global layers see
everything and take `rope_theta` with the configured scaling. q/k/v and gate/up are fused as in llama.py, whose
weight loading this reuses; module names mirror Hugging Face.
"""
import torch
from torch import nn

from loom_kernels import gelu_tanh_and_mul
from server.model.attention import PagedAttention
from server.model.batch import FlatBatch, KVCache
from server.model.config import ModelConfig
from server.model.llama import LlamaForCausalLM
from server.model.qwen3 import Qwen3Attention
from server.model.rope import cos_sin_cache
from server.model.weights.cpu_stack import DecodeStacks
from server.model.weights.head import float_logits


class GemmaRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike Llama's, the product with the weight is taken in float32 and rounded once (transformers' order)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(Qwen3Attention):
    """Qwen3's attention (per-head q/k norms before rotary) with Gemma's norms and `query_pre_attn_scalar` scale."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.is_sliding = cfg.layer_window(layer) is not None  # local layer: windowed, local rotary table
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.query_pre_attn_scalar ** -0.5,
                                   cfg.layer_window(layer))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = Gemma3MLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, batch: FlatBatch, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), batch, cos_sin, k_cache, v_cache)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)


class Gemma3ForCausalLM(nn.Module):
    # q/k/v and gate/up are packed from Hugging Face's separate tensors exactly as for Llama
    packed = LlamaForCausalLM.packed
    shard_sizes = LlamaForCausalLM.shard_sizes
    load_weights = LlamaForCausalLM.load_weights
    expected_weights = LlamaForCausalLM.expected_weights
    enable_decode_stack = LlamaForCausalLM.enable_decode_stack  # the C++ stack runs Gemma's layer too

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed_scale = cfg.hidden_size ** 0.5
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)  # global layers
        self.register_buffer("cos_sin_local", torch.empty(0), persistent=False)  # sliding-window layers
        self.decode_stacks: DecodeStacks | None = None
        self.post_init()

    def post_init(self) -> None:
        """Tie the head and compute both rotary tables (float32) on the weights' device; the loader calls this again
        after `to_empty`, which unties parameters and leaves buffers uninitialised."""
        c = self.config
        if c.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # quantized heads carry their own codes
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.norm.weight.device
        if device.type != "meta":  # built on meta first; the loader calls this again once weights have a device
            self.cos_sin = cos_sin_cache(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                         c.rope_scaling).to(device)
            self.cos_sin_local = cos_sin_cache(c.head_dim, c.max_position_embeddings, c.rope_local_theta,
                                               None).to(device)

    def forward(self, batch: FlatBatch, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm."""
        x = self.model.embed_tokens(batch.input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # the scale rounded to the model dtype first
        if self.decode_stacks is not None and self.decode_stacks.takes(batch, kv_cache):
            return self.decode_stacks.run(x, batch)
        for i, layer in enumerate(self.model.layers):
            cos_sin = self.cos_sin_local if layer.self_attn.is_sliding else self.cos_sin
            x = layer(x, batch, cos_sin, kv_cache.k[i], kv_cache.v[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = float_logits(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # squash into (-cap, cap), as Gemma was trained
            logits = torch.tanh(logits / cap) * cap
        return logits
