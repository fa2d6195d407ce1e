"""The int4pack / int8pack linears against the de-quantize + float32 `F.linear` reference, on shapes that are not
multiples of the group (K) or of int4pack's 16 output rows (N)."""
import pytest
import torch

from loom_kernels.quant import (
    dequantize_q4_ref,
    pack_q4,
    pack_q8,
    q4_linear,
    q4_linear_ref,
    q8_linear,
    q8_linear_ref,
    quantize_q4,
    quantize_q8,
)


def random_q4(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = torch.rand(n, groups, generator=gen) * 0.02
    m = -torch.rand(n, groups, generator=gen) * 0.15
    return codes, d, m + 8 * d  # a GGUF Q4_1 block: scale d, zero m + 8 d


@pytest.mark.parametrize("n,k,group", [(960, 576, 32), (100, 96, 32), (37, 70, 32), (64, 300, 64), (16, 256, 256)])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_q4_linear_float32_is_exact(n, k, group, m):
    codes, scale, zero = random_q4(n, k, group, seed=n + k)
    x = torch.randn(m, k)
    out = q4_linear(x, pack_q4(codes, scale, zero, group, dtype=torch.float32))
    # float32 scales and activations: only the summation order differs from the reference
    torch.testing.assert_close(out, q4_linear_ref(x, codes, scale, zero, group), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(960, 576), (37, 70)])
@pytest.mark.parametrize("m", [1, 8, 64])
def test_q4_linear_bfloat16(n, k, m):
    codes, scale, zero = random_q4(n, k, 32, seed=m)
    x = torch.randn(2, m, k)
    out = q4_linear(x, pack_q4(codes, scale, zero, 32))
    ref = q4_linear_ref(x, codes, scale, zero, 32)
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    # bf16 activations and scales (8 significant bits): error ~2^-8 of the summed magnitude sqrt(K) * |x| * |w|
    torch.testing.assert_close(out, ref, atol=0.02 * k ** 0.5 * 0.15, rtol=0.02)


def test_quantize_q4_round_trips_within_half_a_step():
    w = torch.randn(48, 100)
    codes, scale, zero = quantize_q4(w, 32)
    back = dequantize_q4_ref(codes, scale, zero, 32)
    step = scale.repeat_interleave(32, dim=1)[:, :100]
    assert (back - w).abs().le(step / 2 + 1e-6).all()


@pytest.mark.parametrize("n,k,m", [(49152 // 64, 576, 1), (40, 70, 5)])
def test_q8_linear(n, k, m):
    torch.manual_seed(k)
    codes, scale = quantize_q8(torch.randn(n, k))
    x = torch.randn(m, k)
    ref = q8_linear_ref(x, codes, scale)
    torch.testing.assert_close(q8_linear(x, pack_q8(codes, scale, torch.float32)), ref, atol=1e-3, rtol=1e-4)
    out = q8_linear(x, pack_q8(codes, scale))  # bf16 kernel: ~2^-8 relative on scales, activations and output
    torch.testing.assert_close(out, ref, atol=0.05 * k ** 0.5, rtol=0.02)
