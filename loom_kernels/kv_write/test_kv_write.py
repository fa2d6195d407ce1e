"""Triton KV-cache scatter against the PyTorch reference: block sizes, skipped (-1) slots, strided k/v views cut
from a fused QKV tensor, and a dtype conversion into the cache."""
import pytest
import torch

from loom_kernels.kv_write.reference import write_kv_ref
from loom_kernels.kv_write.triton_kernel import write_kv_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A same-dtype scatter is a copy: bit exact. Converting fp32 into a bf16 cache may differ by one bf16 ulp (2^-8
# relative): the Triton interpreter truncates to bf16 where torch rounds to nearest.
TOL = {torch.float32: {"atol": 0, "rtol": 0}, torch.float16: {"atol": 0, "rtol": 0},
       torch.bfloat16: {"atol": 0, "rtol": 2 ** -7}}


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                   (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                   (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 80)])
def test_write_kv(num_kv_heads, head_dim, block_size, src_dtype, cache_dtype):
    torch.manual_seed(block_size + head_dim)
    num_tokens, num_blocks, num_q_heads = 11, 13, 4
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1  # tokens whose KV is not written
    # k and v as strided views into one fused projection [T, (Hq + 2 Hkv) * D], as the model produces them.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(src_dtype)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots.to(device=DEVICE, dtype=torch.int64 if block_size == 1 else torch.int32)
    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    write_kv_ref(k, v, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, **TOL[cache_dtype])
    torch.testing.assert_close(v_cache, v_ref, **TOL[cache_dtype])


def test_write_kv_all_skipped_and_empty():
    k_cache = torch.zeros(2, 4, 1, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(3, 1, 64, device=DEVICE)
    write_kv_triton(k, k, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int32, device=DEVICE))
    write_kv_triton(k[:0], k[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert not k_cache.any() and not v_cache.any()
