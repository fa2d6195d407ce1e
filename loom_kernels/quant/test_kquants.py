"""The GGUF block kernels (kquants) against gguf-py: de-quantization bit for bit equal to `gguf.quants.dequantize` for
every type on random blocks (random quants and packed scales, odd fp16 d / dmin: negative, subnormal, zero), and the
GEMM against `x.float() @ dequantize_gguf(w).T` at every activation-row count the kernel treats apart (1..4 per
pass, remainders, several passes), on rows that are not a multiple of its 16-row tasks, K past a 256-weight tile
(a short last tile for the 32-weight types), and fused weights that mix types. The large-M GEMM (gguf_linear_tiled)
against the same reference at small and large M, across chunks of de-quantized rows that cross segments and do not
divide N.

Tolerances, elementwise against the sum of absolute products `|x| @ |W|.T` (the scale any float32 summation order
errs relative to): float32 activations 1e-5 of it (~170 float32 roundings; the kernel's and the reference's own
summation orders differ); bfloat16 activations as float32 plus the one rounding of the output to bfloat16 (at most
2^-8 of the output: allowed 2^-7, one bfloat16 ulp)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from loom_kernels.quant import (
    GGUF_KERNEL_TYPES,
    GGUFBlocks,
    concat_gguf_blocks,
    dequantize_gguf,
    gguf_blocks,
    gguf_kernels_available,
    gguf_linear,
    gguf_linear_tiled,
    row_bytes,
)
from loom_kernels.quant.kquants import _args, _compiled, q8_activations

pytestmark = pytest.mark.skipif(not gguf_kernels_available(), reason="no C++ compiler for the GGUF kernels")

BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# byte offsets of each block's fp16 fields (d, and m / dmin where the type has one)
HALVES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
          "Q6_K": (208,)}
# fp16 d / dmin for weights of about +-1: the largest |code * scale| a block can hold, per field
SPAN = {"Q4_0": (8,), "Q4_1": (15, -1), "Q5_0": (16,), "Q5_1": (31, -1), "Q8_0": (127,), "Q4_K": (15 * 63, 63),
        "Q5_K": (31 * 63, 63), "Q6_K": (32 * 128,)}
ODD_HALVES = np.array([-2.0, -1e-3, 6e-8, -6e-8, 1e-5, 3.14159, 0.0, -0.0, 0.0125, -7.5e-4], dtype=np.float16)
F32_TOL = 1e-5
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 16, 33]


def random_blocks(qtype: str, n: int, k: int, seed: int, scale: float | None = None) -> GGUFBlocks:
    """Random bytes for the quants and packed scales; the fp16 fields drawn from ODD_HALVES and small normals
    (scale None), or sized for weights of about +-scale (a usable layer)."""
    rng = np.random.default_rng(seed)
    blocks = k // BLOCK[qtype]
    raw = rng.integers(0, 256, size=(n, blocks, row_bytes(qtype, k) // blocks), dtype=np.uint8)
    for offset, span in zip(HALVES[qtype], SPAN[qtype]):
        if scale is None:
            pool = np.concatenate([ODD_HALVES, (rng.standard_normal(32) * 0.01).astype(np.float16)])
            h = rng.choice(pool, size=(n, blocks)).astype(np.float16)
        else:
            h = (scale / span * rng.uniform(0.5, 1.5, size=(n, blocks))).astype(np.float16)
        raw[:, :, offset:offset + 2] = h.view(np.uint8).reshape(n, blocks, 2)
    return gguf_blocks(torch.from_numpy(raw.reshape(n, -1)), qtype, k)


def reference(w: GGUFBlocks) -> torch.Tensor:
    return torch.cat([torch.from_numpy(quants.dequantize(raw.numpy(), GGMLQuantizationType[qtype]))
                      for raw, qtype in w.segments])


def assert_matches(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out vs x.float() @ weight.T, within F32_TOL of |x| @ |W|.T (and 2^-7 of the output for a bf16/fp16 out, plus
    half of fp16's subnormal step: near zero an fp16 output's rounding is absolute)."""
    xf = x.float().reshape(-1, x.shape[-1])
    ref = xf @ weight.T
    bound = F32_TOL * (xf.abs() @ weight.abs().T) + 1e-30
    got = out.float().reshape(ref.shape)
    if out.dtype != torch.float32:
        bound = bound + 2 ** -7 * ref.abs() + (2 ** -25 if out.dtype == torch.float16 else 0.0)
    err = (got - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"


def shapes(qtype: str) -> list[tuple[int, int]]:
    if BLOCK[qtype] == 256:
        return [(37, 256), (5, 768), (16, 512)]
    return [(37, 32), (37, 96), (3, 800), (16, 256)]  # 800 = 25 blocks: a short last tile


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
def test_dequantize_is_bit_exact_with_gguf_py(qtype):
    for i, (n, k) in enumerate(shapes(qtype)):
        w = random_blocks(qtype, n, k, seed=i)
        got = dequantize_gguf(w)
        assert got.shape == (n, k) and got.dtype == torch.float32
        assert torch.equal(got, reference(w)), (qtype, n, k)


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
@pytest.mark.parametrize("m", ROWS)
def test_gguf_linear_float32(qtype, m):
    k = 512 if BLOCK[qtype] == 256 else 288  # 9 blocks: a whole tile and a short one
    w = random_blocks(qtype, 37, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    out = gguf_linear(x, w)
    assert out.shape == (m, 37) and out.dtype == torch.float32
    assert_matches(out, x, dequantize_gguf(w))


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
@pytest.mark.parametrize("m", [1, 4, 7])
def test_gguf_linear_bfloat16(qtype, m):
    w = random_blocks(qtype, 21, 256, seed=100 + m)
    x = torch.randn(2, m, 256).to(torch.bfloat16)
    out = gguf_linear(x, w)
    assert out.shape == (2, m, 21) and out.dtype == torch.bfloat16
    assert_matches(out, x, dequantize_gguf(w))


def fused_qkv() -> GGUFBlocks:
    """q, k in Q4_K and v in Q6_K (a Q4_K_M file's attention), then the 32-weight types, as one weight."""
    parts = [("Q4_K", 40), ("Q4_K", 24), ("Q6_K", 24), ("Q5_K", 3), ("Q8_0", 17), ("Q4_0", 5), ("Q4_1", 16),
             ("Q5_0", 1), ("Q5_1", 9)]
    return concat_gguf_blocks([random_blocks(t, n, 512, seed=i) for i, (t, n) in enumerate(parts)])


@pytest.mark.parametrize("m", [1, 3, 4, 5, 33])
def test_mixed_segments_are_the_rows_in_order(m):
    w = fused_qkv()
    weight = dequantize_gguf(w)
    assert weight.shape == (w.n, 512) and torch.equal(weight, reference(w))
    x = torch.randn(m, 512)
    out = gguf_linear(x, w)
    assert out.shape == (m, w.n)
    assert_matches(out, x, weight)
    col = 0
    for raw, qtype in w.segments:  # each segment's columns are its own weight's
        part = gguf_linear(x, gguf_blocks(raw, qtype, 512))
        torch.testing.assert_close(out[:, col:col + raw.shape[0]], part, rtol=0, atol=0)
        col += raw.shape[0]


def test_strided_and_batched_activations():
    w = random_blocks("Q4_K", 20, 256, seed=7)
    weight = dequantize_gguf(w)
    big = torch.randn(5, 300)
    x = big[:, 10:266]  # rows 300 apart
    assert_matches(gguf_linear(x, w), x, weight)
    xt = big[:, 10:266].t().contiguous().t()  # column-major
    assert_matches(gguf_linear(xt, w), xt, weight)
    half = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(7)).half()
    out = gguf_linear(half, w)
    assert out.shape == (3, 2, 20) and out.dtype == torch.float16
    assert_matches(out, half, weight)


# Segments of 275 rows at K = 2048, where a panel is 128 rows (1 MB of float32): panels cross segments, and N = 1100
# ends in a short one.
TILED_QTYPES = ["Q4_K", "Q6_K", "Q8_0", "Q5_1"]


@pytest.mark.parametrize("m", [1, 5, 64, 300])
def test_gguf_linear_tiled_float32(m):
    w = concat_gguf_blocks([random_blocks(t, 275, 2048, seed=i, scale=0.05) for i, t in enumerate(TILED_QTYPES)])
    x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m))
    out = gguf_linear_tiled(x, w)
    assert out.shape == (m, 1100) and out.dtype == torch.float32
    assert_matches(out, x, dequantize_gguf(w))


def test_gguf_linear_tiled_under_inference_mode_and_one_thread():
    """The worker threads' matmuls write an inference tensor (the server runs in inference mode), and one thread
    runs every panel itself."""
    w = concat_gguf_blocks([random_blocks("Q4_K", 300, 2048, seed=4, scale=0.05),
                            random_blocks("Q8_0", 30, 2048, seed=5, scale=0.05)])
    x = torch.randn(40, 2048)
    weight = dequantize_gguf(w)
    with torch.inference_mode():
        out = gguf_linear_tiled(x, w)
    assert out.is_inference()
    assert_matches(out, x, weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_matches(gguf_linear_tiled(x, w), x, weight)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m", [1, 3, 33])
def test_gguf_linear_tiled_mixed_segments(m):
    w = fused_qkv()
    weight = dequantize_gguf(w)
    x = torch.randn(m, 512)
    out = gguf_linear_tiled(x, w)
    assert out.shape == (m, w.n)
    assert_matches(out, x, weight)
    assert_matches(gguf_linear(x, w), x, weight)  # the two GEMMs agree through the reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gguf_linear_tiled_half_activations(dtype):
    w = concat_gguf_blocks([random_blocks("Q4_K", 40, 256, seed=1), random_blocks("Q6_K", 9, 256, seed=2)])
    x = torch.randn(2, 35, 256).to(dtype)
    out = gguf_linear_tiled(x, w)
    assert out.shape == (2, 35, 49) and out.dtype == dtype
    assert_matches(out, x, dequantize_gguf(w))


def test_gguf_linear_tiled_strided_activations_and_errors():
    w = random_blocks("Q5_K", 20, 256, seed=9)
    weight = dequantize_gguf(w)
    big = torch.randn(7, 300)
    for x in (big[:, 10:266], big[:, 10:266].t().contiguous().t()):  # rows 300 apart, column-major
        assert_matches(gguf_linear_tiled(x, w), x, weight)
    x = torch.randn(3, 256, requires_grad=True)  # read as data, as gguf_linear reads it
    assert_matches(gguf_linear_tiled(x, w).detach(), x.detach(), weight)
    with pytest.raises(ValueError, match="256 input features"):
        gguf_linear_tiled(torch.randn(1, 512), w)
    with pytest.raises(ValueError, match="needs uint8 rows of 176 bytes"):
        gguf_linear_tiled(torch.randn(1, 256), GGUFBlocks([(torch.zeros(4, 128, dtype=torch.uint8), "Q5_K")], 256))
    ext = _compiled()
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.gguf_linear_tiled(torch.randn(1, 256), [torch.zeros(4, 128, dtype=torch.uint8)], [12], 256)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.gguf_linear_tiled(torch.randn(1, 256).double(), *_args(w), 256)


def test_row_bytes_and_flat_raw():
    assert [row_bytes(t, 256) for t in GGUF_KERNEL_TYPES] == [144, 160, 176, 192, 272, 144, 176, 210]
    w = random_blocks("Q6_K", 6, 512, seed=3)
    raw, _ = w.segments[0]
    flat = gguf_blocks(raw.reshape(-1), "Q6_K", 512)  # a GGUF tensor's bytes as read: one row per 2 superblocks
    assert flat.n == 6 and flat.nbytes == raw.numel() and flat.qtypes == ["Q6_K"]
    assert torch.equal(dequantize_gguf(flat), dequantize_gguf(w))


def test_bad_weights_are_refused_with_clear_errors():
    raw = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not one the kernel runs"):
        gguf_blocks(raw, "Q3_K", 256)
    with pytest.raises(ValueError, match="not a positive multiple of 256"):
        gguf_blocks(raw, "Q4_K", 288)
    with pytest.raises(ValueError, match="take 144 bytes"):
        gguf_blocks(torch.zeros(4, 140, dtype=torch.uint8), "Q4_K", 256)
    with pytest.raises(TypeError, match="uint8"):
        gguf_blocks(raw.to(torch.int8), "Q4_K", 256)
    w = gguf_blocks(raw, "Q4_K", 256)
    with pytest.raises(ValueError, match="256 input features"):
        gguf_linear(torch.randn(1, 512), w)
    with pytest.raises(ValueError, match="different input features"):
        concat_gguf_blocks([w, random_blocks("Q8_0", 2, 512, seed=0)])
    with pytest.raises(ValueError, match="needs uint8 rows of 144 bytes"):  # a segment changed after the check
        gguf_linear(torch.randn(1, 256), GGUFBlocks([(torch.zeros(4, 128, dtype=torch.uint8), "Q4_K")], 256))
    ext = _compiled()  # the extension checks on its own too (the decode stack calls it from C++)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.gguf_linear(torch.randn(1, 256), [torch.zeros(4, 128, dtype=torch.uint8)], [12], 256)
    with pytest.raises(RuntimeError, match="not one this kernel runs"):
        ext.gguf_dequantize([raw], [11], 256)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_instruction_set_paths(isa):
    """The AVX2 and plain C++ paths, built held below this CPU's ISA (a build of a few tens of seconds, so every GEMM
    of the extension is checked here): one fused weight of every type, de-quantized bit for bit and multiplied at one
    and several passes, against float activations and int8 ones per 32 values; a fused K-quant weight against int8
    activations per 256 values."""
    from loom_kernels.cpu.platform import cpu_flags
    if isa == "avx2" and "avx2" not in cpu_flags():
        pytest.skip("the CPU has no AVX2")
    ext = _compiled(isa)
    w = fused_qkv()
    raws, types = _args(w)
    weight = ext.gguf_dequantize(raws, types, w.k)
    assert torch.equal(weight, reference(w))
    for m in (1, 6):
        x = torch.randn(m, w.k)
        assert_matches(ext.gguf_linear(x, raws, types, w.k), x, weight)
        assert_matches(ext.gguf_linear_tiled(x, raws, types, w.k), x, weight)
        assert_matches(ext.gguf_linear_q8(x, raws, types, w.k), q8_activations(x), weight)
    kq = concat_gguf_blocks([random_blocks(t, n, 256, seed=i) for i, (t, n) in
                             enumerate([("Q4_K", 13), ("Q6_K", 8), ("Q5_K", 3)])])
    raws, types = _args(kq)
    for m in (1, 6):
        x = torch.randn(m, 256)
        assert_matches(ext.gguf_linear_q8k(x, raws, types, 256), q8_activations(x, 256), dequantize_gguf(kq))


def test_without_a_compiler_the_kernels_say_so(monkeypatch):
    from loom_kernels.quant import kquants
    w = random_blocks("Q4_K", 4, 256, seed=0)
    monkeypatch.setattr(kquants, "_compiled", lambda isa=None: None)  # what a failed build leaves
    assert not gguf_kernels_available()
    with pytest.raises(RuntimeError, match="need a C\\+\\+ compiler"):
        gguf_linear(torch.randn(1, 256), w)
    with pytest.raises(RuntimeError, match="need a C\\+\\+ compiler"):
        gguf_linear_tiled(torch.randn(1, 256), w)
    with pytest.raises(RuntimeError, match="need a C\\+\\+ compiler"):
        dequantize_gguf(w)
