"""Triton paged attention (decode and prefill) against the PyTorch reference: GQA ratios, block sizes, ragged and
block-edge lengths, shuffled physical blocks, split-K on and off, chunked prefill and prefix hits, dtypes, sliding
windows (the references' windows against a row-by-row oracle first).

Shapes are small: on a machine without a GPU these run in the Triton interpreter, 100-1000x slower than torch, so
there the larger grids run a covering subset (every value of each parameter, and every pair of the two that interact
most) instead of the full product, which a GPU runs."""
import itertools

import pytest
import torch

from loom_kernels.attention.decode_triton import choose_num_splits, paged_attention_decode_triton
from loom_kernels.attention.prefill_triton import paged_attention_prefill_triton
from loom_kernels.attention.reference import gather_kv, paged_attention_decode_ref, paged_attention_prefill_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "gqa8": (8, 1)}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def grid(axes: list[list], covering: list[tuple]) -> list[tuple]:
    """The full product of `axes` on a GPU; `covering` in the interpreter."""
    return list(itertools.product(*axes)) if DEVICE == "cuda" else covering
# Max elementwise |triton - reference| (atol + rtol * |ref|). Outputs are convex mixes of V rows, so |out| <~ 1.
# fp32: fp32 math on both sides (ieee dots), only the summation order differs.
# fp16: both round the output to fp16 (ulp 2^-11..2^-10 here); on GPU P is also rounded to fp16 for the PV dot.
# bf16: 8-bit mantissa (ulp up to 2^-8 here); the interpreter truncates to bf16 instead of rounding, and on GPU
#       P is rounded to bf16 for the PV dot: allow about two ulps.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}


def make_paged(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               extra_blocks: int = 3, spare_cols: int = 2):
    """Random caches and a block table whose rows name shuffled physical blocks, padded with -1 past each sequence's
    blocks (plus `spare_cols` unused columns) to prove the kernels never read padding."""
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + extra_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    table = torch.full((len(lens), max(need, default=0) + spare_cols), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return k_cache, v_cache, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def edge_lens(block_size: int) -> list[int]:
    """Lengths around a block boundary plus a ragged multi-block one."""
    return sorted({1, max(1, block_size - 1), block_size, block_size + 1, 3 * block_size + 5})


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[out.dtype])


@pytest.mark.parametrize("heads,block_size,num_splits", grid(
    [list(HEADS), [1, 8, 16, 32, 64], [1, 3]],
    [("mha", 1, 1), ("gqa4", 1, 3), ("gqa8", 8, 1), ("mha", 8, 3), ("gqa4", 16, 1), ("gqa8", 16, 3),
     ("mha", 32, 1), ("gqa4", 32, 3), ("gqa4", 64, 1), ("gqa8", 64, 3)]))
def test_decode_block_sizes(heads, block_size, num_splits):
    torch.manual_seed(block_size * 10 + num_splits)
    num_heads, num_kv_heads = HEADS[heads]
    lens = edge_lens(block_size) if block_size > 1 else [1, 2, 17]
    k_cache, v_cache, table, seq_lens = make_paged(lens, block_size, num_kv_heads, 64, torch.float32)
    q = torch.randn(len(lens), num_heads, 64, device=DEVICE)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=num_splits)
    check(out, paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.125))


@pytest.mark.parametrize("head_dim,dtype,num_splits", grid(
    [[64, 80, 96, 128], [F16, BF16, F32], [1, 4]],
    [(64, F16, 1), (64, BF16, 4), (80, F32, 1), (80, F16, 4), (96, BF16, 1), (96, F32, 4), (128, F16, 1),
     (128, BF16, 4), (128, F32, 1)]), ids=str)
def test_decode_dtypes_head_dims(head_dim, dtype, num_splits):
    torch.manual_seed(head_dim + num_splits)
    lens = [5, 16, 70, 33]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 16, 2, head_dim, dtype)
    q = torch.randn(len(lens), 8, head_dim, device=DEVICE).to(dtype)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, head_dim ** -0.5,
                                        num_splits=num_splits)
    check(out, paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, head_dim ** -0.5))


@pytest.mark.parametrize("num_splits", [None, 2, 7])
def test_decode_long_and_short_splits(num_splits):
    """More splits than a short sequence has tiles (empty partitions), and a peaked softmax (large scale)."""
    torch.manual_seed(7)
    lens = [3, 300, 129]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 32, 2, 64, torch.float32)
    q = torch.randn(len(lens), 4, 64, device=DEVICE)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, 0.5, num_splits=num_splits,
                                        block_n=16)
    check(out, paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.5))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_empty_sequence(num_splits):
    """A sequence with no cached tokens yields zeros (no NaN), and does not disturb its neighbours."""
    torch.manual_seed(3)
    k_cache, v_cache, table, seq_lens = make_paged([0, 9], 8, 1, 64, torch.float32)
    q = torch.randn(2, 2, 64, device=DEVICE)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out[1:], paged_attention_decode_ref(q[1:], k_cache, v_cache, table[1:], seq_lens[1:], 0.125))


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 128, 132) == 1  # short context: not worth a merge
    assert choose_num_splits(256, 8, 32768, 132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(1, 8, 32768, 132) == 32  # few programs, long context: capped
    assert choose_num_splits(4, 8, 2048, 132) == 8  # limited by min tokens per split
    assert choose_num_splits(0, 8, 4096, 132) == 1


# (query rows, cached length) per sequence: plain prefill, chunked prefill / prefix hit, single token, no rows.
PREFILL_CASES = {
    "plain": [(13, 13), (40, 40), (1, 1)],
    "chunked": [(10, 45), (33, 33), (1, 64)],
    "prefix": [(17, 49), (0, 20), (5, 5), (31, 32)],
}


@pytest.mark.parametrize("case,heads,block_size", grid(
    [list(PREFILL_CASES), list(HEADS), [1, 8, 16, 32, 64]],
    [(case, list(HEADS)[(i + j) % 3], block) for i, case in enumerate(PREFILL_CASES)
     for j, block in enumerate([1, 8, 16, 32, 64])]))
def test_prefill(case, heads, block_size):
    torch.manual_seed(block_size + len(case))
    num_heads, num_kv_heads = HEADS[heads]
    rows, lens = zip(*PREFILL_CASES[case])
    k_cache, v_cache, table, seq_lens = make_paged(list(lens), block_size, num_kv_heads, 64, torch.float32)
    cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]), num_heads, 64, device=DEVICE)
    out = paged_attention_prefill_triton(q, k_cache, v_cache, table, cu, seq_lens, 0.125, block_m=16, block_n=16)
    check(out, paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, 0.125))


@pytest.mark.parametrize("head_dim,dtype", grid(
    [[64, 80, 96, 128], [F16, BF16, F32]],
    [(64, F16), (64, F32), (80, BF16), (96, F16), (128, BF16), (128, F32)]), ids=str)
def test_prefill_dtypes_head_dims(head_dim, dtype):
    """Default tile sizes (64 x 64), GQA 4, a chunk ending mid-block and a prompt spanning several query tiles."""
    torch.manual_seed(head_dim)
    rows, lens = [20, 70], [50, 70]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 16, 2, head_dim, dtype)
    cu = torch.tensor([0, 20, 90], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(rows), 8, head_dim, device=DEVICE).to(dtype)
    out = paged_attention_prefill_triton(q, k_cache, v_cache, table, cu, seq_lens, head_dim ** -0.5)
    check(out, paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, head_dim ** -0.5))


def test_public_ops_dispatch(monkeypatch, kernel_env):
    """On CPU the public ops take Triton only with LOOM_KERNELS=triton (and the interpreter on)."""
    import loom_kernels
    from loom_kernels.backend import use_triton
    torch.manual_seed(1)
    k_cache, v_cache, table, seq_lens = make_paged([9, 20], 8, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64, device=DEVICE)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.125)
    kernel_env("torch")
    assert not use_triton(q)
    monkeypatch.setenv("LOOM_KERNELS", "triton")
    assert not use_triton(q) or q.is_cuda  # resolved once per process: the environment alone changes nothing
    kernel_env("triton")
    assert use_triton(q)  # conftest.py turned the interpreter on where there is no GPU
    check(loom_kernels.paged_attention_decode(q, k_cache, v_cache, table, seq_lens, 0.125), ref)
    if not q.is_cuda:
        kernel_env(None)
        assert not use_triton(q)  # TRITON_INTERPRET=1 alone keeps the CPU serving path on the reference


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], scale: float,
                    window: int | None) -> torch.Tensor:
    """Query row i at `positions[i]` over contiguous keys `k[:positions[i] + 1]` (the last `window` of them), one
    row at a time: the oracle for the references' window semantics."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    rows = []
    for i, p in enumerate(positions):
        lo = 0 if window is None else max(0, p - window + 1)
        scores = torch.einsum("hd,thd->ht", q[i].float(), k[lo:p + 1]) * scale
        rows.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v[lo:p + 1]))
    return torch.stack(rows).to(q.dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 1000])
def test_references_window_match_naive(window):
    """The references' sliding window: position p sees keys p - window < j <= p (Hugging Face's convention)."""
    torch.manual_seed(window)
    rows, lens = [9, 1, 40], [30, 17, 40]  # chunk after a prefix, a decode-like row, a whole prompt
    k_cache, v_cache, table, seq_lens = make_paged(lens, 8, 2, 32, torch.float32)
    cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]), 4, 32, device=DEVICE)
    out = paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, 0.2, window)
    for b, (n, length) in enumerate(zip(rows, lens)):
        k, v = gather_kv(k_cache, table[b], length), gather_kv(v_cache, table[b], length)
        want = naive_attention(q[cu[b]:cu[b + 1]], k, v, list(range(length - n, length)), 0.2, window)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want, atol=1e-5, rtol=1e-5)
    last = torch.stack([q[cu[b + 1] - 1] for b in range(len(rows))])
    dec = paged_attention_decode_ref(last, k_cache, v_cache, table, seq_lens, 0.2, window)
    torch.testing.assert_close(dec, torch.stack([out[cu[b + 1] - 1] for b in range(len(rows))]), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 7, 16, 50])
def test_decode_window(window, num_splits):
    """Windows shorter than, across and longer than the sequences, with context splits over the window only."""
    torch.manual_seed(window + num_splits)
    lens = [1, 8, 9, 45, 130]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 8, 2, 64, torch.float32)
    q = torch.randn(len(lens), 8, 64, device=DEVICE)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, 0.125, window,
                                        num_splits=num_splits, block_n=16)
    check(out, paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.125, window))


@pytest.mark.parametrize("case,window,block_size", grid(
    [list(PREFILL_CASES), [1, 5, 16, 33, 100], [1, 16]],
    [(case, window, [1, 16][(i + j) % 2]) for i, case in enumerate(PREFILL_CASES)
     for j, window in enumerate([1, 5, 16, 33, 100])]))
def test_prefill_window(case, window, block_size):
    """Windows smaller than a query tile (rows that see none of a masked run's keys), about a tile, several tiles."""
    torch.manual_seed(window + block_size + len(case))
    rows, lens = zip(*PREFILL_CASES[case])
    k_cache, v_cache, table, seq_lens = make_paged(list(lens), block_size, 2, 64, torch.float32)
    cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]), 4, 64, device=DEVICE)
    out = paged_attention_prefill_triton(q, k_cache, v_cache, table, cu, seq_lens, 0.125, window, block_m=16,
                                         block_n=16)
    check(out, paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, 0.125, window))


@pytest.mark.parametrize("cache_dtype", [F16, BF16], ids=str)
def test_float32_queries_over_a_narrower_cache(cache_dtype):
    """Decode and prefill with float32 queries over a float16 / bfloat16 cache (a reduced-precision KV cache beside
    float32 activations): the kernels widen what they load, as the reference does."""
    torch.manual_seed(3)
    lens = [5, 16, 70]
    k_cache, v_cache, table, seq_lens = make_paged(lens, 16, 2, 64, cache_dtype)
    q = torch.randn(len(lens), 8, 64, device=DEVICE)
    out = paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=2)
    check(out, paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, 0.125))
    check(out, paged_attention_decode_ref(q, k_cache.float(), v_cache.float(), table, seq_lens, 0.125))
    cu = torch.tensor([0, 5, 8, 28], dtype=torch.int32, device=DEVICE)
    q = torch.randn(28, 8, 64, device=DEVICE)
    out = paged_attention_prefill_triton(q, k_cache, v_cache, table, cu, seq_lens, 0.125)
    check(out, paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, 0.125))
