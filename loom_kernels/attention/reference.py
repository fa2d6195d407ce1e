"""PyTorch reference of paged attention: the CPU serving path and the oracle for the Triton kernels.

Caches are `[num_blocks, block_size, Hkv, D]`, of the queries' dtype or a narrower one (float16 beside float32
queries: read widened); a sequence's tokens live in the blocks its block-table row names.
`window` (sliding-window attention, as Hugging Face's `sliding_window`): the query at position p sees only the keys
at positions `p - window < j <= p`, its own included; None sees every earlier key.
"""
import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence as `[length, Hkv, D]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               window: int | None = None) -> torch.Tensor:
    """q `[B, H, D]`: one query token per sequence attending to its first `seq_lens[b]` cached tokens (the last
    `window` of them with a window)."""
    batch, num_heads, _ = q.shape
    if batch == 0:
        return torch.empty_like(q)
    block_size = k_cache.shape[1]
    lens = seq_lens.tolist()
    num_blocks = (max(lens) + block_size - 1) // block_size
    # Padding entries of a block table may hold anything; clamp so the gather stays in range, then mask.
    table = block_tables[:, :num_blocks].long().clamp_(0, k_cache.shape[0] - 1)
    k = k_cache[table].flatten(1, 2).transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]; a float16 cache widens
    v = v_cache[table].flatten(1, 2).transpose(1, 2).to(q.dtype)
    length = k.shape[2]
    cols = torch.arange(length, device=q.device)[None, :]
    lens_t = seq_lens.to(q.device).long()[:, None]
    mask = cols < lens_t
    if window is not None:
        mask &= cols >= lens_t - window
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=k.shape[1] != num_heads)
    return out.squeeze(2)


def paged_attention_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, window: int | None = None) -> torch.Tensor:
    """q `[T, H, D]`: sequence b owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, its last tokens, causal against
    its `seq_lens[b]` cached tokens (prefix + these), within `window` when one is given."""
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    bounds = cu_seqlens_q.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        num_q = end - start
        if num_q == 0:
            continue
        # keys before the first query's window are seen by no row: leave them out of the product
        lo = 0 if window is None else max(0, length - num_q - window + 1)
        k = gather_kv(k_cache, block_tables[b], length)[lo:].transpose(0, 1).to(q.dtype)  # [Hkv, L - lo, D]
        v = gather_kv(v_cache, block_tables[b], length)[lo:].transpose(0, 1).to(q.dtype)
        if k.shape[0] != num_heads:  # GQA: each KV head serves a group of query heads
            k, v = k.repeat_interleave(num_heads // k.shape[0], 0), v.repeat_interleave(num_heads // k.shape[0], 0)
        # 4-D inputs with equal head counts take torch's fused CPU attention kernel; 3-D ones or enable_gqa fall back
        # to the unfused math path, measured 2-4x slower here (128 x 5,000 tokens: 14 vs 33 ms per layer).
        qb, k, v = q[start:end].transpose(0, 1)[None], k[None], v[None]  # [1, H, nq, D], [1, H, L, D]
        if num_q == length and (window is None or window >= length):  # whole prompt at once: plain causal
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale)
        else:  # query i sits at position length - num_q + i and sees keys up to it (and within the window)
            rows = torch.arange(length - num_q, length, device=q.device)[:, None]
            cols = torch.arange(lo, length, device=q.device)[None, :]
            mask = cols <= rows
            if window is not None:
                mask &= cols > rows - window
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        o = o[0]
        out[start:end] = o.transpose(0, 1)
    return out
