"""Qwen3: the Llama decoder (llama.py) with an RMSNorm over each head of q and of k before rotary.

No bias on q/k/v by default (Qwen2 had one); `head_dim` comes from the config and need not be hidden / heads
(Qwen3-0.6B runs 16 heads of 128 over a hidden size of 1024). Layers from `max_window_layers` on use a sliding window
when the config turns `use_sliding_window` on (config.py). Module names mirror Hugging Face (`self_attn.q_norm`,
`self_attn.k_norm`).
"""
import torch
from torch import nn

from loom_kernels import rotary
from server.model.batch import FlatBatch
from server.model.config import ModelConfig
from server.model.llama import LlamaAttention, LlamaForCausalLM, RMSNorm


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)  # biased with q/k/v here
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)  # one weight of head_dim, shared by every head
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, batch: FlatBatch, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        rotary(q, k, batch.positions, cos_sin)
        return self.o_proj(self.attn(q, k, v, batch, k_cache, v_cache))


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for i, layer in enumerate(self.model.layers):  # the Llama decoder layer around Qwen3's attention
            layer.self_attn = Qwen3Attention(cfg, i)
