"""Triton RMSNorm, optionally fused with the residual add.

One program per row with the whole row in registers (hidden sizes are a few thousand at most), so the sum of
squares is one in-register reduction and x is read once. The math is fp32, rounded exactly where the reference
(Hugging Face) rounds: the residual sum and the normalized row are rounded to the activation dtype before the weight
multiply, so fp16 results match the reference bit for bit up to the rsqrt's last ulp.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols,
                     eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(res_out_ptr.dtype.element_ty)  # torch adds in the activation dtype
        tl.store(res_out_ptr + row * stride_ro + cols, summed, mask=mask)
        h = summed.to(tl.float32)
        normed = (h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)).to(res_out_ptr.dtype.element_ty)
    else:
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D `[rows, hidden]` view (a copy only if the layout forbids a view) with unit column stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Returns `norm(x)`, or `(norm(x + residual), x + residual)`; same dtypes as `rms_norm_ref`."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    r2 = x2 if residual is None else _rows(residual)
    res_out = out if residual is None else torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), out, res_out, x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))
