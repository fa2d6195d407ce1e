"""Triton RMSNorm (with and without the fused residual add) against the PyTorch reference."""
import pytest
import torch

from loom_kernels.rms_norm.reference import rms_norm_ref
from loom_kernels.rms_norm.triton_kernel import rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Both sides compute in fp32 and round at the same places; they differ by rsqrt / summation-order noise, which can
# flip the final rounding by one ulp: fp16 2^-10 relative at worst; bf16 2^-7, doubled because the Triton
# interpreter truncates to bf16 where torch rounds to nearest.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}
# x + residual is one rounding on both sides: exact, but for the interpreter's bf16 truncation (one ulp, 2^-7).
SUM_TOL = {torch.float32: {"atol": 0, "rtol": 0}, torch.float16: {"atol": 0, "rtol": 0},
           torch.bfloat16: {"atol": 0, "rtol": 2 ** -7}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (7, 80), (2, 3, 1000)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape, dtype, with_residual):
    torch.manual_seed(shape[-1])
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    x_before = x.clone()
    out = rms_norm_triton(x, weight, 1e-6, residual)
    ref = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        assert isinstance(out, tuple) and out[1].dtype == ref[1].dtype
        torch.testing.assert_close(out[1], ref[1], **SUM_TOL[dtype])
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(x, x_before)  # inputs are not modified


def test_rms_norm_strided_rows_and_fp32_weight():
    """Rows cut from a wider tensor (row stride != hidden), and an fp32 weight promoting a bf16 input's output."""
    torch.manual_seed(0)
    wide = torch.randn(5, 200, device=DEVICE).to(torch.bfloat16)
    x, weight = wide[:, :96], torch.randn(96, device=DEVICE)
    out, ref = rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    assert rms_norm_triton(x[:0], weight, 1e-5).shape == (0, 96)
