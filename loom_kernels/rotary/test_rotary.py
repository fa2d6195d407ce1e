"""Triton rotary embedding against the PyTorch reference: full and partial rotary, GQA head counts, q/k as
strided views of a fused QKV tensor (rotated in place, V untouched), dtypes."""
import pytest
import torch

from loom_kernels.rotary.reference import rotary_ref
from loom_kernels.rotary.triton_kernel import rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 math on both sides, then one rounding to the activation dtype: differences are fp32 noise (a fused multiply-
# add on GPU) that can flip that rounding by one ulp (fp16 2^-10 relative at worst, bf16 2^-7, doubled for bf16
# because the Triton interpreter truncates where torch rounds to nearest).
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}


def cos_sin_cache(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (128, 128), (64, 32), (80, 80)])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
def test_rotary(heads, head_dim, rot_dim, dtype):
    torch.manual_seed(head_dim + rot_dim)
    num_heads, num_kv_heads = heads
    num_tokens = 9
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    qkv_ref = qkv.clone()
    positions = torch.randint(0, 4096, (num_tokens,), device=DEVICE)
    cache = cos_sin_cache(4096, rot_dim)

    def split(t):
        q = t[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        k = t[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
        return q, k

    rotary_triton(*split(qkv), positions, cache)
    rotary_ref(*split(qkv_ref), positions, cache)
    torch.testing.assert_close(qkv, qkv_ref, **TOL[dtype])
    v_start = (num_heads + num_kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], qkv_ref[:, v_start:])


def test_rotary_contiguous_int32_positions_and_empty():
    torch.manual_seed(0)
    q, k = torch.randn(5, 4, 64, device=DEVICE), torch.randn(5, 2, 64, device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.tensor([0, 1, 2, 100, 7], dtype=torch.int32, device=DEVICE)
    rotary_triton(q, k, positions, cos_sin_cache(128, 64))
    rotary_ref(q_ref, k_ref, positions, cos_sin_cache(128, 64))
    torch.testing.assert_close(q, q_ref, **TOL[torch.float32])
    torch.testing.assert_close(k, k_ref, **TOL[torch.float32])
    rotary_triton(q[:0], k[:0], positions[:0], cos_sin_cache(128, 64))
