"""The C++ CPU RMSNorm(+residual) and rotary against their PyTorch references: widths that are not a power of two,
strided rows (q/k are views of the fused qkv output), bf16 / fp16 / fp32."""
import pytest
import torch

from loom_kernels.fused_cpu.cpu_ops import fused_cpu_available, rms_norm_cpu, rotary_cpu
from loom_kernels.rms_norm.reference import rms_norm_ref
from loom_kernels.rotary.reference import rotary_ref
from loom_kernels.rotary.test_rotary import cos_sin_cache

pytestmark = pytest.mark.skipif(not fused_cpu_available(torch.zeros(1, dtype=torch.bfloat16)),
                                reason="no C++ compiler for the CPU kernels")
# Same fp32 math; the sum of squares runs in another order: at most one rounding step of the output dtype apart.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 8e-3}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,width", [(1, 576), (37, 100), (300, 64)])
def test_rms_norm(rows, width, dtype):
    torch.manual_seed(rows)
    x, res = (3 * torch.randn(rows, width)).to(dtype), torch.randn(rows, width).to(dtype)
    w = (1 + 0.1 * torch.randn(width)).to(dtype)
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **TOL[dtype])
    out, new_res = rms_norm_cpu(x, w, 1e-5, res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert torch.equal(new_res, ref_res)  # one rounded add: identical
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens,rot_dim", [(1, 64), (45, 64), (7, 32)])
def test_rotary_in_place_on_strided_views(tokens, rot_dim, dtype):
    torch.manual_seed(tokens)
    qkv = torch.randn(tokens, 9 * 64 + 2 * 3 * 64).to(dtype)
    cs = cos_sin_cache(4096, rot_dim).cpu()
    positions = torch.randint(0, 4096, (tokens,))
    got, ref = qkv.clone(), qkv.clone()
    for buf, fn in ((got, rotary_cpu), (ref, rotary_ref)):
        q, k, _ = buf.split([576, 192, 192], dim=-1)
        fn(q.reshape(tokens, 9, 64), k.reshape(tokens, 3, 64), positions, cs)
    # fp32 math on both sides; the compiler may contract a*b - c*d into an FMA: one output rounding apart
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("rows,width", [(1, 49152), (32, 49152), (5, 37), (3, 16)])
def test_argmax_rows_matches_torch(rows, width):
    from loom_kernels import argmax_rows
    torch.manual_seed(width)
    x = torch.randn(rows, width)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    ties = torch.randint(0, 3, (rows, width)).float()  # many equal maxima: the first one wins
    assert torch.equal(argmax_rows(ties), ties.argmax(-1))
    masked = torch.full((rows, width), float("-inf"))  # a grammar mask leaving one token, or none at all
    masked[0, width - 1] = -5.0
    assert torch.equal(argmax_rows(masked), masked.argmax(-1))
    strided = torch.randn(width, rows).t()  # columns of another tensor
    assert torch.equal(argmax_rows(strided), strided.argmax(-1))


def test_argmax_rows_nan_and_inf_like_torch():
    from loom_kernels import argmax_rows
    x = torch.randn(4, 40)
    x[0, 30], x[0, 20] = float("nan"), 1e9
    x[1, 3], x[1, 35] = float("inf"), float("nan")
    x[2, 39] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x).tolist()[:3] == [30, 35, 39]
