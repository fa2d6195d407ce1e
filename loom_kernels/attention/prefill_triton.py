"""Triton paged-attention prefill: varlen causal attention of each sequence's newest tokens over its paged cache.

Sequence b owns query rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, its last `nq` tokens, at positions
`seq_lens[b] - nq ..`; their K/V are already in the cache. Plain prefill (nq == seq_len), chunked prefill and prefix
hits (nq < seq_len) are the same computation. One program takes one (query tile of `BLOCK_M` rows, query head) and
runs flash attention (online softmax in the exp2 domain, fp32 accumulators) over KV tiles gathered through the
block table, so any block size works. Keys below the tile's first position are visible to every row and are read
without the causal mask; only the diagonal band is masked.

The grid is sized without reading lengths on the host: sequence b's tiles are numbered from
`cu_seqlens_q[b] // BLOCK_M + b`, which bounds the total by `T // BLOCK_M + B`; each program finds its sequence by
counting those starts and exits if its tile lies past the sequence's rows (sequences with no rows included).

With a sliding `window` (row at position p sees keys `p - window < j <= p`) the tile's keys fall in three runs: those
before the band every row sees (masked), the band (unmasked, whole tiles) and the causal diagonal (masked). Without
one the window is a number larger than any context, the first run is empty and the other two are the plain causal
split.
"""
import torch
import triton
import triton.language as tl

from loom_kernels.attention.decode_triton import LOG2E, NO_WINDOW, dot_config


@triton.jit
def _attend(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kv_head, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, lo, hi, pos, window, scale_log2, offs_n, offs_d, d_mask, MASKED: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys `[lo, hi)` into the running (acc, max, sum). Unmasked: every key is visible to every row and
    `hi - lo` is a multiple of BLOCK_N. Masked: key j is visible to row i iff `pos[i] - window < j <= pos[i]` and
    `j < hi`; a row may see none of a masked run's keys."""
    for t0 in range(lo, hi, BLOCK_N):
        toks = t0 + offs_n
        n_mask = toks < hi
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_in_blk = toks % BLOCK_SIZE
        k_off = blk * stride_kb + slot_in_blk * stride_kt + kv_head * stride_kh
        k_t = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=d_mask[:, None] & n_mask[None, :],
                      other=0.0).to(tl.float32)  # [D, N]: K loaded transposed
        s = tl.dot(q, k_t.to(DOT_DT), input_precision=PRECISION) * scale_log2
        if MASKED:
            visible = (toks[None, :] <= pos[:, None]) & (toks[None, :] > pos[:, None] - window) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: weights 0, not NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + slot_in_blk * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, lens_ptr, out_ptr, scale_log2, num_seqs, window,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_bt, stride_ot, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_B: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    # The owner of tile `pid` is the last sequence whose first tile number is <= pid (those numbers increase).
    offs_b = tl.arange(0, BLOCK_B)
    cu = tl.load(cu_q_ptr + offs_b, mask=offs_b < num_seqs, other=0)
    owns = ((cu // BLOCK_M + offs_b) <= pid) & (offs_b < num_seqs)
    b = tl.sum(owns.to(tl.int32), 0) - 1
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    tile = pid - (q_start // BLOCK_M + b)
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(lens_ptr + b)
    prefix = seq_len - q_len  # cached tokens before this sequence's first query row

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = tile * BLOCK_M + offs_m
    io_mask = (rows < q_len)[:, None] & d_mask[None, :]
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=io_mask,
                other=0.0).to(tl.float32)
    q = q.to(DOT_DT)
    pos = prefix + tl.minimum(rows, q_len - 1)  # padding rows repeat the last row (so each sees a key); not stored

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    first = prefix + tile * BLOCK_M  # position of the tile's first row
    last = tl.minimum(first + BLOCK_M, seq_len) - 1  # and of its last real row
    kv_lo = tl.maximum(first - window + 1, 0)  # no row of the tile sees a key before this
    band_lo = tl.maximum(last - window + 1, 0)  # keys band_lo .. first are visible to every row
    band_hi = band_lo + tl.maximum(first - band_lo, 0) // BLOCK_N * BLOCK_N  # whole tiles of them
    kv_end = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)  # one past the last key any row sees
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kv_head, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, kv_lo, band_lo, pos, window, scale_log2, offs_n, offs_d,
                            d_mask, True, BLOCK_SIZE, BLOCK_N, DOT_DT, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kv_head, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, band_lo, band_hi, pos, window, scale_log2, offs_n,
                            offs_d, d_mask, False, BLOCK_SIZE, BLOCK_N, DOT_DT, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kv_head, stride_kb, stride_kt, stride_kh,
                            stride_vb, stride_vt, stride_vh, band_hi, kv_end, pos, window, scale_log2, offs_n,
                            offs_d, d_mask, True, BLOCK_SIZE, BLOCK_N, DOT_DT, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_attention_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float, window: int | None = None, *, block_m: int = 64,
                                   block_n: int = 64) -> torch.Tensor:
    """q `[T, H, D]` -> `[T, H, D]`: sequence b's rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]` are its last tokens,
    causal against its `seq_lens[b]` cached tokens, within `window` when one is given. `block_m`/`block_n` are the
    query/key tile sizes (>= 16)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    q, block_tables, cu_seqlens_q, seq_lens = (t if t.stride(-1) == 1 else t.contiguous()
                                               for t in (q, block_tables, cu_seqlens_q, seq_lens))
    dot_dt, precision = dot_config(q.dtype, q.device)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale * LOG2E, num_seqs, window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_B=max(16, triton.next_power_of_2(num_seqs)),
        DOT_DT=dot_dt, PRECISION=precision, num_warps=4, num_stages=2)
    return out
