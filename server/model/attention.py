"""Paged attention over a flat batch: store this step's K/V, then prefill rows and decode rows each take their op.

A layer with a sliding `window` attends to the last `window` positions only (its own included, Hugging Face's
`sliding_window`); the ops read the window's part of its cache. In a model that mixes windowed and full layers each
layer reads and writes through its KV group's tables (`kv_group`, set by `assign_kv_groups`; model/kv_layout.py),
and a windowed group's pages behind the window go back to the pool."""
import torch
from torch import nn

from loom_kernels import paged_attention_decode, paged_attention_prefill, write_kv
from server.model.batch import FlatBatch
from server.model.kv_layout import KVLayout


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.window = window
        self.kv_group = 0  # whose block tables it addresses its cache through (a grouped KV layout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: FlatBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, Hkv, D]` -> `[T, H * D]`."""
        slot_mapping, block_tables = batch.tables_for(self.kv_group)
        write_kv(k, v, k_cache, v_cache, slot_mapping)
        num_prefill_seqs, num_prefill_tokens = batch.num_prefill_seqs, batch.num_prefill_tokens
        if num_prefill_tokens == q.shape[0]:  # prefill-only step
            out = paged_attention_prefill(q, k_cache, v_cache, block_tables, batch.cu_seqlens_q,
                                          batch.seq_lens, self.scale, self.window)
        elif num_prefill_seqs == 0:  # decode-only step: the common case while serving
            out = paged_attention_decode(q, k_cache, v_cache, block_tables, batch.seq_lens, self.scale,
                                         self.window)
        else:
            out = torch.empty_like(q)
            out[:num_prefill_tokens] = paged_attention_prefill(
                q[:num_prefill_tokens], k_cache, v_cache, block_tables[:num_prefill_seqs], batch.cu_seqlens_q,
                batch.seq_lens[:num_prefill_seqs], self.scale, self.window)
            out[num_prefill_tokens:] = paged_attention_decode(
                q[num_prefill_tokens:], k_cache, v_cache, block_tables[num_prefill_seqs:],
                batch.seq_lens[num_prefill_seqs:], self.scale, self.window)
        return out.flatten(1)


def assign_kv_groups(model: nn.Module, layout: KVLayout | None) -> None:
    """Point each attention layer (in layer order) at its KV group's tables; without a layout, all at group 0."""
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    if layout is not None and len(layers) != len(layout.layer_group):
        raise ValueError(f"{len(layers)} attention layers for a KV layout of {len(layout.layer_group)}")
    for i, attn in enumerate(layers):
        attn.kv_group = 0 if layout is None else layout.layer_group[i]
