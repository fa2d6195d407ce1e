"""Segmented LoRA (SGMV-style, as Punica): the tokens of one adapter form a segment; a shrink kernel multiplies each
segment by its adapter's A (`[R, K]`) into a small float32 buffer, an expand kernel multiplies that by its B
(`[N, R]`) and adds the result to the base linear's output rows. One launch each for the whole batch, whatever mix of
adapters it holds; a program tile never spans two segments, so it reads one adapter's weights."""
import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, rows_ptr, starts_ptr, slots_ptr, tmp_ptr, K, R, stride_x, stride_as, stride_ar,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    start, end = tl.load(starts_ptr + seg), tl.load(starts_ptr + seg + 1)
    m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < end
    rows = tl.load(rows_ptr + m, mask=m_mask, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=m_mask[:, None] & (k[None, :] < K),
                     other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * stride_as + r[None, :] * stride_ar + k[:, None],
                    mask=(r[None, :] < R) & (k[:, None] < K), other=0.0).to(tl.float32)  # A^T tile [BLOCK_K, BLOCK_R]
        acc += tl.dot(xs, a)
    tl.store(tmp_ptr + m[:, None] * BLOCK_R + r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _expand_kernel(tmp_ptr, b_ptr, rows_ptr, starts_ptr, slots_ptr, y_ptr, N, R, stride_y, stride_bs, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    start, end = tl.load(starts_ptr + seg), tl.load(starts_ptr + seg + 1)
    m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < end
    rows = tl.load(rows_ptr + m, mask=m_mask, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    t = tl.load(tmp_ptr + m[:, None] * BLOCK_R + r[None, :], mask=m_mask[:, None], other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + n[None, :] * stride_bn + r[:, None],
                mask=(n[None, :] < N) & (r[:, None] < R), other=0.0).to(tl.float32)  # B^T tile [BLOCK_R, BLOCK_N]
    delta = tl.dot(t, b)
    out_mask = m_mask[:, None] & (n[None, :] < N)
    y_ptrs = y_ptr + rows[:, None] * stride_y + n[None, :]
    y = tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=out_mask)


def lora_add_triton(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rows: torch.Tensor,
                    seg_starts: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int,
                    block_m: int = 16, block_n: int = 64, block_k: int = 64) -> None:
    """As `lora_add_ref`; `max_seg_len` (the longest segment, known on the host) sizes the grid without a sync."""
    num_segs, (_, rank, k), n = seg_slots.shape[0], a_stack.shape, b_stack.shape[1]
    if num_segs == 0 or max_seg_len == 0:
        return
    assert x.stride(-1) == 1 and y.stride(-1) == 1 and a_stack.is_contiguous() and b_stack.is_contiguous()
    block_r = max(16, triton.next_power_of_2(rank))
    tmp = torch.empty((rows.shape[0], block_r), dtype=torch.float32, device=x.device)
    tiles_m = triton.cdiv(max_seg_len, block_m)
    _shrink_kernel[(num_segs, tiles_m)](x, a_stack, rows, seg_starts, seg_slots, tmp, k, rank, x.stride(0),
                                        a_stack.stride(0), a_stack.stride(1), BLOCK_M=block_m, BLOCK_R=block_r,
                                        BLOCK_K=block_k)
    _expand_kernel[(num_segs, tiles_m, triton.cdiv(n, block_n))](
        tmp, b_stack, rows, seg_starts, seg_slots, y, n, rank, y.stride(0), b_stack.stride(0), b_stack.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
