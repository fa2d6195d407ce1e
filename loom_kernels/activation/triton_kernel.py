"""Triton gated activations in one pass over x: `silu(x[..., :I]) * x[..., I:]` (SiLU-and-mul, Llama) and
`gelu_tanh(x[..., :I]) * x[..., I:]` (GeGLU with the tanh-approximated GELU, Gemma).

The math is fp32; the activated gate is rounded to the activation dtype before the product, as the references (two
torch ops) do, so the two agree to the last ulp in fp16/bf16.
"""
import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    z = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
    # tanh(z) = 1 - 2 / (exp(2z) + 1): Triton has no portable tanh (the interpreter included). |z| > 15 is +-1 in
    # float32 anyway; clamping there keeps exp(2z) finite
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    gelu = (0.5 * gate * (1.0 + tanh)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (gelu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _gated(kernel, x: torch.Tensor, block: int) -> torch.Tensor:
    """x `[..., 2I]` -> `[..., I]` through one of the kernels above."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = min(block, triton.next_power_of_2(inter))
        kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_triton(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x `[..., 2I]` -> `[..., I]`."""
    return _gated(_silu_and_mul_kernel, x, block)


def gelu_tanh_and_mul_triton(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x `[..., 2I]` -> `[..., I]`."""
    return _gated(_gelu_tanh_and_mul_kernel, x, block)
