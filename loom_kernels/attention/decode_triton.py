"""Triton paged-attention decode: one query token per sequence, split-K ("flash-decoding").

Decode is memory bound: every cached K/V byte is read once per step. One program handles one (sequence, KV head,
context split) and all `H / Hkv` query heads of that KV head's group, so GQA reads each K/V tile once for the whole
group (the group is padded to 16 rows, the smallest `tl.dot` tile). Tiles of `BLOCK_N` tokens are gathered through
the block table token by token, which makes any block size work (1 included) and keeps tiles wide when blocks are
small. With a few long sequences, `batch * Hkv` programs cannot fill the GPU, so the context is cut into
`num_splits` partitions: kernel 1 writes each partition's running (max, sum, unnormalized acc), kernel 2 merges them
with the usual log-sum-exp rescaling. With one split, kernel 1 normalizes and writes the output itself.

Nothing here reads a device value on the host, so a decode step can be captured in a CUDA graph: the split count
comes from the block table's width (the longest context it can describe), and each sequence cuts its own length
into that many partitions (partitions past its end are empty and merge with weight 0). With a sliding `window` a
sequence attends to its last `window` tokens only: those are what its partitions cut.
"""
import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # the window of full attention: more tokens than any context (and int32-safe)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, scale_log2,
                         window, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_bt, stride_ob, stride_oh, num_heads,
                         NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_DT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = tl.maximum(seq_len - window, 0)  # the first key the query sees
    part = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N  # this sequence's partition, whole tiles
    start = lo + split * part
    end = tl.minimum(start + part, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q.to(DOT_DT)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + offs_n
        n_mask = toks < end
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_in_blk = toks % BLOCK_SIZE
        k_off = blk * stride_kb + slot_in_blk * stride_kt + kv_head * stride_kh  # [BLOCK_N]
        k_t = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=d_mask[:, None] & n_mask[None, :],
                      other=0.0).to(tl.float32)  # [D, N]: K loaded transposed
        s = tl.dot(q, k_t.to(DOT_DT), input_precision=PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + slot_in_blk * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DT), v.to(DOT_DT), input_precision=PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 gives zeros rather than NaN
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G] into [B, H, S]
        tl.store(m_ptr + row, m_i, mask=g_mask)
        tl.store(l_ptr + row, l_i, mask=g_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)


@triton.jit
def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, num_heads,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    row = (b * num_heads + h) * NUM_SPLITS + offs_s
    m = tl.load(m_ptr + row, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0): weights all 0
    w = tl.exp2(m - m_max)  # empty splits have m = -inf: weight 0
    denom = tl.sum(w * l, 0)
    acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int, *,
                      min_tokens_per_split: int = 256, max_splits: int = 32) -> int:
    """Split the context only when `batch * num_kv_heads` programs leave SMs idle (aim for about two waves), and
    never into partitions shorter than `min_tokens_per_split`, where the merge costs more than the parallelism buys."""
    programs = batch * num_kv_heads
    if programs == 0 or max_seq_len < 2 * min_tokens_per_split:
        return 1
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, max_seq_len // min_tokens_per_split, max_splits))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting only adds work


def dot_config(dtype: torch.dtype, device: torch.device) -> tuple[tl.dtype, str]:
    """(dot operand dtype, input precision). On GPU: the model dtype on tensor cores, and true fp32 for fp32 models
    (not tf32). On CPU (the interpreter, whose bf16 dot is broken) every dot is fp32."""
    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL_DTYPE[dtype], "tf32"  # precision applies to fp32 operands only; tf32 is the default


def paged_attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  window: int | None = None, *, num_splits: int | None = None,
                                  block_n: int = 64) -> torch.Tensor:
    """q `[B, H, D]` -> `[B, H, D]`: one query per sequence over its first `seq_lens[b]` cached tokens (the last
    `window` of them with a window).
    `num_splits` forces the context split count (1 = no split); by default `choose_num_splits` picks it."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty_like(q)
    if batch == 0:
        return out
    q, block_tables, seq_lens = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, block_tables, seq_lens))
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, _num_sms(q.device))
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_dt, precision = dot_config(q.dtype, q.device)
    if num_splits > 1:
        m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, l, acc, scale * LOG2E, window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_heads, NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=max(16, block_n), DOT_DT=dot_dt, PRECISION=precision, num_warps=4, num_stages=2)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            m, l, acc, out, out.stride(0), out.stride(1), num_heads, NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4)
    return out
