"""Triton gated activations (SiLU-and-mul, tanh-GELU-and-mul) against the PyTorch references: row shapes, widths
that are not a power of two or that span several column blocks, strided rows, dtypes."""
import pytest
import torch

from loom_kernels.activation.reference import gelu_tanh_and_mul_ref, silu_and_mul_ref
from loom_kernels.activation.triton_kernel import gelu_tanh_and_mul_triton, silu_and_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Same roundings on both sides (the activated gate rounded to the dtype, then the product); exp/tanh differences can
# flip a rounding by one ulp: fp16 2^-10 relative, bf16 2^-7 (doubled: the Triton interpreter truncates to bf16).
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}
OPS = {"silu": (silu_and_mul_triton, silu_and_mul_ref), "gelu_tanh": (gelu_tanh_and_mul_triton, gelu_tanh_and_mul_ref)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,block", [((5, 2 * 96), 1024), ((2, 3, 2 * 1000), 256), ((1, 2 * 64), 16)], ids=str)
def test_gated_activation(op, shape, block, dtype):
    triton_op, ref_op = OPS[op]
    torch.manual_seed(shape[-1])
    x = (4 * torch.randn(shape, device=DEVICE)).to(dtype)
    out = triton_op(x, block=block)
    ref = ref_op(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("op", list(OPS))
def test_gated_activation_strided_rows_and_empty(op):
    triton_op, ref_op = OPS[op]
    torch.manual_seed(0)
    x = torch.randn(6, 300, device=DEVICE)[::2, :256]  # row stride 600, not 256
    torch.testing.assert_close(triton_op(x), ref_op(x), **TOL[torch.float32])
    assert triton_op(x[:0]).shape == (0, 128)


def test_gelu_tanh_saturates():
    """Large gates: the exp-based tanh saturates to gelu(x) = x (or 0) instead of overflowing."""
    x = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    torch.testing.assert_close(gelu_tanh_and_mul_triton(x), gelu_tanh_and_mul_ref(x), **TOL[torch.float32])
