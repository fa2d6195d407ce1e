"""GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied head. Hugging Face stores its projections
as Conv1D (`[in, out]`), so `load_weights` transposes them into `nn.Linear` layout."""
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from server.model.attention import PagedAttention
from server.model.batch import FlatBatch, KVCache
from server.model.config import ModelConfig
from server.model.weights.head import float_logits

ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh":
               lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, cfg.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, batch: FlatBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).reshape(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(q, k, v, batch, k_cache, v_cache))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, batch: FlatBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, k_cache, v_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(nn.Module):
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    def post_init(self) -> None:
        """Tie the head to the token embedding (again after the loader's `to_empty`)."""
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, batch: FlatBatch, kv_cache: KVCache) -> torch.Tensor:
        t = self.transformer
        x = t.wte(batch.input_ids) + t.wpe(batch.positions)
        for i, block in enumerate(t.h):
            x = block(x, batch, kv_cache.k[i], kv_cache.v[i])
        return t.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return float_logits(self.lm_head, hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        filled = set()
        for name, tensor in weights:
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers of old checkpoints; the head is tied to wte
            if not name.startswith("transformer."):
                name = "transformer." + name
            if name.endswith(self.conv1d):
                tensor = tensor.t()
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in GPT2LMHeadModel")
            params[name].copy_(tensor)
            filled.add(name)
        return filled

    def expected_weights(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}
