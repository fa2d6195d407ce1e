"""Triton rotary embedding (neox / `rotate_half` style), in place on q and k, partial rotary included.

One program per token rotates all its q heads and k heads: the cos/sin row is loaded once and shared. Only the
first `rot_dim = cos_sin_cache.shape[1]` features of each head rotate (pairs `j` and `j + rot_dim/2`); q and k may
be strided views into the fused QKV projection (unit stride on the last dim).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base, stride_h, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (j < HALF)
    p1 = base + heads * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q `[T, H, D]` and k `[T, Hkv, D]` in place; `cos_sin_cache[pos] = cat(cos, sin)` over rot_dim/2 each."""
    num_tokens = q.shape[0]
    half = cos_sin_cache.shape[1] // 2
    assert 2 * half <= q.shape[-1] and q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if num_tokens == 0 or half == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1], HALF=half, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
