"""The block kernels (GGUF Q4 / Q8_0 blocks, float16 scales) against de-quantize + float32 `F.linear`, on shapes that
are not multiples of the 32-weight block (K) or of the kernel's 16-row tiles (N), at every activation-row count the
kernel treats apart (1..4 per pass, remainders, several passes)."""
import pytest
import torch

from loom_kernels.quant import (
    block_kernels_available,
    block_linear_ref,
    block_q4_linear,
    block_q8_linear,
    dequantize_block_ref,
    pack_block_q4,
    pack_block_q8,
)
from loom_kernels.quant.reference import dequantize_q4_ref

pytestmark = pytest.mark.skipif(not block_kernels_available(), reason="no C++ compiler for the block kernels")

SHAPES = [(960, 576), (37, 70), (100, 96), (17, 1536)]
ROWS = [1, 2, 3, 4, 5, 8, 33]


def q4_1_blocks(n: int, k: int, seed: int):
    """A GGUF Q4_1 weight: codes, and d / m exactly representable in float16, as int4pack's (scale, zero)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // 32)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, groups, generator=gen) * 0.02).half().float()
    m = (-torch.rand(n, groups, generator=gen) * 0.15).half().float()
    return codes, d, m + 8 * d


@pytest.mark.parametrize("n,k", SHAPES)
def test_q4_packing_keeps_a_gguf_block_exactly(n, k):
    codes, scale, zero = q4_1_blocks(n, k, seed=n)
    w = pack_block_q4(codes, scale, zero)
    assert w.codes.shape == (n, -(-k // 32) * 16) and w.codes.dtype == torch.uint8
    # same weights as int4pack's convention, bit for bit (d and m are float16 values)
    assert torch.equal(dequantize_block_ref(w), dequantize_q4_ref(codes, scale, zero, 32))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_q4_block_linear_float32(n, k, m):
    codes, scale, zero = q4_1_blocks(n, k, seed=n + m)
    w = pack_block_q4(codes, scale, zero)
    x = torch.randn(m, k)
    out = block_q4_linear(x, w)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # float32 throughout: only the summation order differs (|w| <= 0.45, K <= 1536 terms)
    torch.testing.assert_close(out, block_linear_ref(x, w), atol=2e-4 * k ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(960, 576), (37, 70)])
@pytest.mark.parametrize("m", [1, 4, 7])
def test_q4_block_linear_bfloat16(n, k, m):
    codes, scale, zero = q4_1_blocks(n, k, seed=m)
    w = pack_block_q4(codes, scale, zero)
    x = torch.randn(2, m, k).to(torch.bfloat16)
    out = block_q4_linear(x, w)
    assert out.shape == (2, m, n) and out.dtype == torch.bfloat16
    # activations are the same bf16 values in both; the kernel accumulates in float32 and rounds once to bf16
    ref = block_linear_ref(x.float(), w)
    torch.testing.assert_close(out.float(), ref, atol=1e-3 * k ** 0.5, rtol=2 ** -8)


@pytest.mark.parametrize("n,k", SHAPES + [(49152 // 64, 576)])
@pytest.mark.parametrize("m", ROWS)
def test_q8_block_linear(n, k, m):
    gen = torch.Generator().manual_seed(n * m)
    codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    d = torch.rand(n, -(-k // 32), generator=gen) * 0.01
    w = pack_block_q8(codes, d)
    x = torch.randn(m, k)
    out = block_q8_linear(x, w)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, block_linear_ref(x, w), atol=2e-4 * k ** 0.5, rtol=1e-4)
    half = block_q8_linear(x.half(), w)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), block_linear_ref(x.half().float(), w), atol=2e-3 * k ** 0.5, rtol=2 ** -10)


def test_strided_rows_and_non_contiguous_input():
    codes, scale, zero = q4_1_blocks(48, 64, seed=3)
    w = pack_block_q4(codes, scale, zero)
    big = torch.randn(5, 200)
    x = big[:, 10:74]  # rows 200 apart
    torch.testing.assert_close(block_q4_linear(x, w), block_linear_ref(x, w), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(block_q4_linear(big[:, 10:74].t().contiguous().t(), w), block_linear_ref(x, w),
                               atol=1e-3, rtol=1e-4)


def test_wrong_k_is_refused():
    codes, scale, zero = q4_1_blocks(16, 64, seed=4)
    with pytest.raises(ValueError, match="64 input features"):
        block_q4_linear(torch.randn(1, 96), pack_block_q4(codes, scale, zero))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_instruction_set_paths(isa):
    """The AVX2 and plain-loop paths, built held below this CPU's ISA (what `--cpu-isa avx2` builds)."""
    from loom_kernels.cpu.platform import cpu_flags
    from loom_kernels.quant.blocks import _compiled
    if isa == "avx2" and "avx2" not in cpu_flags():
        pytest.skip("the CPU has no AVX2")
    ext = _compiled(isa)
    codes, scale, zero = q4_1_blocks(37, 70, seed=5)
    w4 = pack_block_q4(codes, scale, zero)
    w8 = pack_block_q8(torch.randint(-128, 128, (37, 70), dtype=torch.int8), torch.rand(37, 3) * 0.01)
    for m in (1, 4, 6):
        x = torch.randn(m, 70)
        torch.testing.assert_close(ext.block_linear(x, w4.codes, w4.d, w4.m, 0), block_linear_ref(x, w4),
                                   atol=2e-4 * 70 ** 0.5, rtol=1e-4)
        torch.testing.assert_close(ext.block_linear(x, w8.codes, w8.d, w8.d, 1), block_linear_ref(x, w8),
                                   atol=2e-4 * 70 ** 0.5, rtol=1e-4)
