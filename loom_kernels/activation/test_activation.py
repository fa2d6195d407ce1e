"""Triton SiLU-and-mul against the PyTorch reference: row shapes, widths that are not a power of two or that span
several column blocks, strided rows, dtypes."""
import pytest
import torch

from loom_kernels.activation.reference import silu_and_mul_ref
from loom_kernels.activation.triton_kernel import silu_and_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Same roundings on both sides (silu rounded to the dtype, then the product); exp differences can flip a rounding
# by one ulp: fp16 2^-10 relative, bf16 2^-7 (doubled: the Triton interpreter truncates to bf16).
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,block", [((5, 2 * 96), 1024), ((2, 3, 2 * 1000), 256), ((1, 2 * 64), 16)], ids=str)
def test_silu_and_mul(shape, block, dtype):
    torch.manual_seed(shape[-1])
    x = (4 * torch.randn(shape, device=DEVICE)).to(dtype)
    out = silu_and_mul_triton(x, block=block)
    ref = silu_and_mul_ref(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_silu_and_mul_strided_rows_and_empty():
    torch.manual_seed(0)
    x = torch.randn(6, 300, device=DEVICE)[::2, :256]  # row stride 600, not 256
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **TOL[torch.float32])
    assert silu_and_mul_triton(x[:0]).shape == (0, 128)
