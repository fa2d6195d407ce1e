"""The int8-activation GGUF GEMM (kquants_q8.h) against its reference: `q8_activations(x) @ dequantize_gguf(w).T`,
within the float32 tolerance of test_kquants (1e-5 of `|xq| @ |W|.T`: the integer dots are exact, only the float32
summation order differs), for every type at every activation-row count the kernel treats apart, short last tiles,
mixed segments, bf16 activations and strided input (the plain C++ path: test_kquants' instruction-set test). The
reference's own rounding is checked against its definition: each value within half a step (max|x| / 254) of x."""
from __future__ import annotations

import pytest
import torch

from loom_kernels.quant import GGUF_KERNEL_TYPES, GGUFBlocks, dequantize_gguf, gguf_kernels_available, gguf_linear_q8
from loom_kernels.quant.kquants import q8_activations
from loom_kernels.quant.test_kquants import BLOCK, F32_TOL, ROWS, fused_qkv, random_blocks

pytestmark = pytest.mark.skipif(not gguf_kernels_available(), reason="no C++ compiler for the GGUF kernels")


def assert_q8_matches(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out vs q8_activations(x) @ weight.T in float64, within F32_TOL of |xq| @ |W|.T (and 2^-7 of the output for a
    bf16 out: its one rounding)."""
    xq = q8_activations(x.float()).double().reshape(-1, x.shape[-1])
    w = weight.double()
    ref = xq @ w.T
    bound = F32_TOL * (xq.abs() @ w.abs().T) + 1e-30
    if out.dtype != torch.float32:
        bound = bound + 2 ** -7 * ref.abs() + (2 ** -25 if out.dtype == torch.float16 else 0.0)
    err = (out.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"


def test_q8_activations_round_each_block_to_its_own_step():
    x = torch.randn(3, 96) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(32)
    x[1, 32:64] = 0.0  # an all-zero block stays zero
    xq = q8_activations(x)
    step = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    codes = xq.reshape(3, 3, 32) / torch.where(step > 0, step, torch.ones_like(step))
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001
    assert bool(((xq - x).reshape(3, 3, 32).abs() <= step / 2 * 1.0001 + 1e-30).all())
    assert torch.equal(xq[1, 32:64], torch.zeros(32))


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
@pytest.mark.parametrize("m", ROWS)
def test_gguf_linear_q8_float32(qtype, m):
    k = 512 if BLOCK[qtype] == 256 else 288  # 9 blocks: a whole tile and a short one
    w = random_blocks(qtype, 37, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    out = gguf_linear_q8(x, w)
    assert out.shape == (m, 37) and out.dtype == torch.float32
    assert_q8_matches(out, x, dequantize_gguf(w))


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
def test_gguf_linear_q8_usable_layer_stays_close_to_float(qtype):
    """On weights sized like a trained layer's and Gaussian activations, the activations' rounding (noise of about
    max|x| / 440 per value: ~0.6% of x's spread) moves the output by under 1.5% of its norm: what the operator
    trades for speed."""
    w = random_blocks(qtype, 64, 512, seed=3, scale=0.05)
    x = torch.randn(4, 512)
    weight = dequantize_gguf(w)
    exact = x @ weight.T
    err = (gguf_linear_q8(x, w) - exact).norm() / exact.norm()
    assert err < 0.015, err


def check_float32_and_bfloat16(kernel, check, w: GGUFBlocks, m: int) -> None:
    """kernel(x, w) for float32 and bfloat16 activations of m rows, each checked against the de-quantized weight
    (`check(out, x, weight)`); the bfloat16 output stays bfloat16."""
    weight = dequantize_gguf(w)
    x = torch.randn(m, w.k)
    check(kernel(x, w), x, weight)
    xb = x.to(torch.bfloat16)
    out = kernel(xb, w)
    assert out.dtype == torch.bfloat16
    check(out, xb.float(), weight)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 33])
def test_gguf_linear_q8_mixed_segments_and_bfloat16(m):
    check_float32_and_bfloat16(gguf_linear_q8, assert_q8_matches, fused_qkv(), m)


def test_gguf_linear_q8_strided_and_batched_activations():
    w = random_blocks("Q4_K", 16, 256, seed=9)
    x = torch.randn(2, 3, 512)[..., ::2]
    out = gguf_linear_q8(x, w)
    assert out.shape == (2, 3, 16)
    assert_q8_matches(out, x.contiguous(), dequantize_gguf(w))
