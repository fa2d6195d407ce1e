"""The C++ CPU decode kernel against the PyTorch reference (same cases as the Triton kernel's tests, sliding windows
included)."""
import pytest
import torch

from loom_kernels.attention.cpu_decode import cpu_decode_available, paged_attention_decode_cpu
from loom_kernels.attention.reference import paged_attention_decode_ref
from loom_kernels.attention.test_attention import edge_lens, make_paged

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not cpu_decode_available(),
                                reason="CPU kernel needs a C++ compiler; GPU hosts use Triton")
# fp32: only the summation order differs; bf16/fp16: both sides round the output once (an ulp at |out| < ~2).
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (9, 3), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 64 and 128 take the compile-time specialised loops
def test_matches_reference(dtype, block_size, num_heads, num_kv_heads, head_dim):
    torch.manual_seed(block_size * 7 + num_heads + head_dim)
    lens = edge_lens(block_size)
    k_cache, v_cache, table, seq_lens = make_paged(lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(lens), num_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    got = paged_attention_decode_cpu(q, k_cache, v_cache, table, seq_lens, scale)
    want = paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_strided_query_and_zero_length():
    k_cache, v_cache, table, seq_lens = make_paged([5, 0, 17], 8, 2, 64, torch.float32)
    qkv = torch.randn(3, 12, 64)  # q is a strided view, as the model's split of a fused qkv projection gives
    q = qkv[:, :8]
    got = paged_attention_decode_cpu(q, k_cache, v_cache, table, seq_lens, 0.125)
    want = paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros(8, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80])  # the specialised loop and the generic one
@pytest.mark.parametrize("window", [1, 7, 16, 1000])
def test_window_matches_reference(window, head_dim, dtype):
    torch.manual_seed(window + head_dim)
    lens = edge_lens(8) + [0]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 8, 2, head_dim, dtype)
    q = torch.randn(len(lens), 6, head_dim).to(dtype)
    got = paged_attention_decode_cpu(q, k_cache, v_cache, table, seq_lens, 0.1, window)
    want = paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.1, window)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 80)])
@pytest.mark.parametrize("window", [None, 7])
def test_float32_queries_over_a_narrower_cache(cache_dtype, num_heads, num_kv_heads, head_dim, window):
    """A float16 / bfloat16 cache under float32 queries (the reduced-precision KV cache of float32 models): the
    cached values are read exactly (widened), so the kernel matches the reference over the widened cache as closely
    as two float32 summation orders do."""
    torch.manual_seed(head_dim + num_heads)
    lens = edge_lens(16)
    k_cache, v_cache, table, seq_lens = make_paged(lens, 16, num_kv_heads, head_dim, cache_dtype)
    q = torch.randn(len(lens), num_heads, head_dim)
    scale = head_dim ** -0.5
    got = paged_attention_decode_cpu(q, k_cache, v_cache, table, seq_lens, scale, window)
    assert got.dtype == torch.float32
    want = paged_attention_decode_ref(q, k_cache.float(), v_cache.float(), table, seq_lens, scale, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mixed = paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, scale, window)  # the reference widens too
    torch.testing.assert_close(mixed, want, atol=1e-6, rtol=1e-6)


def test_a_cache_of_another_dtype_is_refused():
    k_cache, v_cache, table, seq_lens = make_paged([5], 8, 2, 64, torch.float16)
    with pytest.raises(RuntimeError, match="float16 / bfloat16 under float32 queries"):
        paged_attention_decode_cpu(torch.randn(1, 4, 64, dtype=torch.bfloat16), k_cache, v_cache, table, seq_lens,
                                   0.125)
