"""SmolLM3: the Llama decoder (llama.py) with rotary left out of some layers ("NoPE").

`no_rope_layers[i] == 0` marks a layer that attends without any position encoding (every fourth layer in SmolLM3-3B,
from `no_rope_layer_interval`; config.py follows transformers' rule). With `use_sliding_window`, the NoPE layers
attend within the window. Head embeddings are tied by default.
"""
import torch
from torch import nn

from loom_kernels import rotary
from server.model.batch import FlatBatch
from server.model.config import ModelConfig
from server.model.llama import LlamaAttention, LlamaForCausalLM


class SmolLM3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)  # biased with q/k/v here
        self.use_rope = bool(cfg.no_rope_layers[layer])

    def forward(self, x: torch.Tensor, batch: FlatBatch, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            rotary(q, k, batch.positions, cos_sin)
        return self.o_proj(self.attn(q, k, v, batch, k_cache, v_cache))


class SmolLM3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for i, layer in enumerate(self.model.layers):  # the Llama decoder layer around SmolLM3's attention
            layer.self_attn = SmolLM3Attention(cfg, i)
