"""The K-quant GEMM against int8 activations per 256 values (kquants_q8k.h) against its reference,
`q8_activations(x, 256) @ dequantize_gguf(w).T`, within test_kquants' float32 tolerance (1e-5 of `|xq| @ |W|.T`:
the integer sums are exact, only the float32 order of the superblock and min terms differs): every K-quant type at
every activation-row count the 4 x 2 blocks treat apart (and several blocks), odd weight rows (a pair's missing row),
several panels, a fused Q4_K / Q6_K / Q5_K weight, bf16 and strided activations (the plain C++ path: test_kquants'
instruction-set test). Types without integer sub-block scales are refused by name."""
from __future__ import annotations

import pytest
import torch

from loom_kernels.quant import (
    Q8K_TYPES,
    GGUFBlocks,
    concat_gguf_blocks,
    dequantize_gguf,
    gguf_kernels_available,
    gguf_linear_q8k,
)
from loom_kernels.quant.kquants import q8_activations
from loom_kernels.quant.test_kquants import F32_TOL, random_blocks
from loom_kernels.quant.test_kquants_q8 import check_float32_and_bfloat16

pytestmark = pytest.mark.skipif(not gguf_kernels_available(), reason="no C++ compiler for the GGUF kernels")


def assert_q8k_matches(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    xq = q8_activations(x.float(), 256).double().reshape(-1, x.shape[-1])
    w = weight.double()
    ref = xq @ w.T
    bound = F32_TOL * (xq.abs() @ w.abs().T) + 1e-30
    if out.dtype != torch.float32:
        bound = bound + 2 ** -7 * ref.abs()
    err = (out.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"


def mixed_kquants(k: int = 512) -> GGUFBlocks:
    """q, k in Q4_K, v in Q6_K and a few Q5_K rows: a Q4_K_M / Q5_K_M file's fused projections."""
    parts = [("Q4_K", 40), ("Q4_K", 23), ("Q6_K", 24), ("Q5_K", 3)]
    return concat_gguf_blocks([random_blocks(t, n, k, seed=i) for i, (t, n) in enumerate(parts)])


def test_q8_activations_per_256_round_each_block_to_its_own_step():
    x = torch.randn(2, 512) * torch.tensor([1e-3, 30.0]).repeat_interleave(256)
    xq = q8_activations(x, 256)
    step = x.reshape(2, 2, 256).abs().amax(-1, keepdim=True) / 127
    assert bool(((xq - x).reshape(2, 2, 256).abs() <= step / 2 * 1.0001).all())
    codes = xq.reshape(2, 2, 256) / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127.001


@pytest.mark.parametrize("qtype", Q8K_TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 11])
def test_gguf_linear_q8k_float32(qtype, m):
    w = random_blocks(qtype, 37, 512, seed=m)  # 37 rows: the last pair has one row
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    out = gguf_linear_q8k(x, w)
    assert out.shape == (m, 37) and out.dtype == torch.float32
    assert_q8k_matches(out, x, dequantize_gguf(w))


def test_gguf_linear_q8k_many_panels_and_rows():
    """150 rows of K = 2,048: several panels per thread; 70 activation rows: many 4-row blocks and a tail."""
    w = random_blocks("Q4_K", 150, 2048, seed=5)
    x = torch.randn(70, 2048)
    assert_q8k_matches(gguf_linear_q8k(x, w), x, dequantize_gguf(w))


@pytest.mark.parametrize("m", [1, 6, 33])
def test_gguf_linear_q8k_mixed_segments_and_bfloat16(m):
    check_float32_and_bfloat16(gguf_linear_q8k, assert_q8k_matches, mixed_kquants(), m)


def test_gguf_linear_q8k_strided_activations_and_zero_rows():
    w = random_blocks("Q6_K", 16, 256, seed=9)
    x = torch.randn(2, 3, 512)[..., ::2]
    x[0, 1] = 0.0  # an all-zero row: d = 0, output 0
    out = gguf_linear_q8k(x, w)
    assert out.shape == (2, 3, 16) and torch.equal(out[0, 1], torch.zeros(16))
    assert_q8k_matches(out, x.contiguous(), dequantize_gguf(w))


@pytest.mark.parametrize("qtype", Q8K_TYPES)
def test_gguf_linear_q8k_usable_layer_stays_close_to_float(qtype):
    """Trained-layer-sized weights and Gaussian activations: rounding per 256 values (steps ~1.3x the per-32 ones)
    moves the output by under 2% of its norm."""
    w = random_blocks(qtype, 64, 512, seed=3, scale=0.05)
    x = torch.randn(8, 512)
    exact = x @ dequantize_gguf(w).T
    err = (gguf_linear_q8k(x, w) - exact).norm() / exact.norm()
    assert err < 0.02, err


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_1"])
def test_gguf_linear_q8k_refuses_types_without_integer_scales(qtype):
    w = concat_gguf_blocks([random_blocks("Q4_K", 4, 256, seed=0), random_blocks(qtype, 4, 256, seed=1)])
    with pytest.raises(ValueError, match=f"not {qtype}"):
        gguf_linear_q8k(torch.randn(2, 256), w)
