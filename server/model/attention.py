"""Paged attention over a flat batch: store this step's K/V, then prefill rows and decode rows each take their op.

A layer with a sliding `window` attends to the last `window` positions only (its own included, Hugging Face's
`sliding_window`); its cache still keeps every token, the ops just read the window's part of it."""
import torch
from torch import nn

from loom_kernels import paged_attention_decode, paged_attention_prefill, write_kv
from server.model.batch import FlatBatch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: FlatBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, Hkv, D]` -> `[T, H * D]`."""
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        num_prefill_seqs, num_prefill_tokens = batch.num_prefill_seqs, batch.num_prefill_tokens
        if num_prefill_tokens == q.shape[0]:  # prefill-only step
            out = paged_attention_prefill(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens_q,
                                          batch.seq_lens, self.scale, self.window)
        elif num_prefill_seqs == 0:  # decode-only step: the common case while serving
            out = paged_attention_decode(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, self.scale,
                                         self.window)
        else:
            out = torch.empty_like(q)
            out[:num_prefill_tokens] = paged_attention_prefill(
                q[:num_prefill_tokens], k_cache, v_cache, batch.block_tables[:num_prefill_seqs], batch.cu_seqlens_q,
                batch.seq_lens[:num_prefill_seqs], self.scale, self.window)
            out[num_prefill_tokens:] = paged_attention_decode(
                q[num_prefill_tokens:], k_cache, v_cache, batch.block_tables[num_prefill_seqs:],
                batch.seq_lens[num_prefill_seqs:], self.scale, self.window)
        return out.flatten(1)
