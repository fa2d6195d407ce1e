"""The C++ segmented LoRA product against `lora_add_ref`: the reference's shapes (ranks above and below a vector,
widths that are not multiples of its chunk, rows in any order, no adapter at all), empty segments, a batch whose base
rows are skipped (never written), slots padded with zero ranks, and float32 / bfloat16 / float16 activations."""
import pytest
import torch

from loom_kernels.lora.cpu_lora import lora_add_cpu, lora_cpu_available, lora_slot_meta
from loom_kernels.lora.reference import lora_add_ref
from loom_kernels.lora.test_lora import SHAPES, case, per_token

pytestmark = pytest.mark.skipif(not lora_cpu_available(*[torch.zeros(1, 1)] * 2, *[torch.zeros(1, 1, 1)] * 2),
                                reason="no C++ compiler for the CPU kernels")

# float32 accumulation in another order than torch's matmuls: float32 a few ulps apart; in bf16/fp16 the reference
# rounds the shrink and the expand to the dtype and the C++ rounds only the sum, up to a rounding of y apart.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-2, "rtol": 1e-2},
       torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2}}


def check(y, x, a, b, rows, starts, slots, dtype, base_rows, meta=None):
    expected = y.clone()
    lora_add_ref(expected, x, a, b, rows, starts, slots)
    untouched = y.clone()
    lora_add_cpu(y, x, a, b, rows, starts, slots, meta)
    torch.testing.assert_close(y, expected, **TOL[dtype])
    assert torch.equal(y[base_rows], untouched[base_rows])  # the base model's rows are not written at all


# a decode step's qkv projection of a small model, and a batch of 15 rows with work enough for every thread
DECODE = (8, 576, 960, 48, 4, [-1, 0, 1, 2, 3, -1, 0, 1])
WIDE = (16, 576, 1920, 48, 2, [0] * 15 + [-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [DECODE, WIDE], ids=str)
def test_cpu_lora_matches_reference(shape, dtype):
    t, k, n, rank, slots, token_slot = shape
    y, x, a, b, rows, starts, seg_slots, _ = case(t, k, n, rank, slots, token_slot, dtype)
    check(y, x, a, b, rows, starts, seg_slots, dtype, [i for i, s in enumerate(token_slot) if s < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_lora_long_segments_take_the_gemm_beside_short_ones(dtype):
    """A prompt's 30 rows on slot 1 (a GEMM) in the same call as 3 decode rows on slot 0 and base rows."""
    token_slot = [1] * 30 + [-1, 0, -1, 0, 0, -1]
    y, x, a, b, rows, starts, seg_slots, _ = case(36, 64, 72, 8, 2, token_slot, dtype, seed=5)
    check(y, x, a, b, rows, starts, seg_slots, dtype, [30, 32, 35])


@pytest.mark.parametrize("copies", [1, 6], ids=["loops", "gemm"])
def test_cpu_lora_float32_matches_the_per_token_product(copies):
    token_slot = [2, -1, 0, 0, -1, 1, 2, 2] * copies
    y, x, a, b, rows, starts, seg_slots, _ = case(len(token_slot), 96, 200, 12, 3, token_slot, seed=3)
    expected = per_token(y, x, a, b, token_slot)
    lora_add_cpu(y, x, a, b, rows, starts, seg_slots)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_lora_empty_segments_and_zero_padded_ranks(dtype):
    """Segments of no rows (slot 1 here) and slot stacks whose last ranks are zero, as LoraLinear pads a smaller
    adapter: the same result as the reference, base rows 1 and 4 untouched."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 64, generator=g).to(dtype), torch.randn(6, 80, generator=g).to(dtype)
    a, b = torch.zeros(3, 24, 64, dtype=dtype), torch.zeros(3, 80, 24, dtype=dtype)
    for slot, rank in enumerate((8, 24, 5)):
        a[slot, :rank] = (torch.randn(rank, 64, generator=g) / 8).to(dtype)
        b[slot, :, :rank] = torch.randn(80, rank, generator=g).to(dtype)
    rows = torch.tensor([5, 0, 3, 2], dtype=torch.long)
    starts = torch.tensor([0, 2, 2, 4, 4], dtype=torch.int32)  # slot 0: rows 5, 0; slot 1: none; slot 2: 3, 2; slot 0
    slots = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    check(y, x, a, b, rows, starts, slots, dtype, [1, 4])


def test_cpu_lora_no_segments_changes_nothing():
    y, x = torch.randn(3, 16), torch.randn(3, 8)
    before = y.clone()
    lora_add_cpu(y, x, torch.randn(2, 4, 8), torch.randn(2, 16, 4), torch.empty(0, dtype=torch.long),
                 torch.zeros(1, dtype=torch.int32), torch.empty(0, dtype=torch.int32))
    assert torch.equal(y, before)


def test_cpu_lora_refuses_out_of_range_slots_and_rows():
    y, x, a, b = torch.zeros(2, 16), torch.zeros(2, 8), torch.zeros(2, 4, 8), torch.zeros(2, 16, 4)
    starts = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="slot 2 out of range"):
        lora_add_cpu(y, x, a, b, torch.tensor([0]), starts, torch.tensor([2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="row 5 out of range"):
        lora_add_cpu(y, x, a, b, torch.tensor([5]), starts, torch.tensor([1], dtype=torch.int32))


def fused_stacks(dtype, parts=(130, 64, 64), k=96, cap=8, ranks=(8, 3, 0), present=((0, 1, 2), (0, 2), ())):
    """Slot stacks of a fused projection as `fuse` lays them out: A the present parts' rows one after the other, B
    block-diagonal (each part's outputs on its own rank columns), both zero-padded to `len(parts) * cap` ranks."""
    g = torch.Generator().manual_seed(2)
    n, r_cap = sum(parts), len(parts) * cap
    a, b = torch.zeros(len(ranks), r_cap, k), torch.zeros(len(ranks), n, r_cap)
    for slot, (rank, used) in enumerate(zip(ranks, present)):
        for j, p in enumerate(used):
            a[slot, j * rank:(j + 1) * rank] = torch.randn(rank, k, generator=g) / k ** 0.5
            first = sum(parts[:p])
            b[slot, first:first + parts[p], j * rank:(j + 1) * rank] = torch.randn(parts[p], rank, generator=g)
    return a.to(dtype), b.to(dtype)


def test_slot_meta_spans_the_non_zero_parts():
    a, b = fused_stacks(torch.float32)
    meta = [lora_slot_meta(a[s], b[s]).tolist() for s in range(3)]
    # outputs 0-129 (q: chunks 0-2, the third shared with k), 130-193 (k), 194-257 (v); chunks of 64
    assert meta[0] == [24, 0, 8, 0, 8, 0, 16, 8, 24, 16, 24]
    assert meta[1] == [6, 0, 3, 0, 3, 0, 3, 3, 6, 3, 6]  # rank 3: q on columns 0-2, k absent, v on 3-5
    assert meta[2] == [0] + [0] * 10  # an empty slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_lora_with_slot_meta_matches_reference(dtype):
    """Fused, block-diagonal stacks read through their metadata (spans across a part boundary inside a chunk, a part
    left out, an empty slot): the reference's result, base rows untouched."""
    a, b = fused_stacks(dtype)
    meta = torch.stack([lora_slot_meta(a[s], b[s]) for s in range(3)])
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 96, generator=g).to(dtype), torch.randn(7, 258, generator=g).to(dtype)
    rows = torch.tensor([4, 0, 2, 6, 3], dtype=torch.long)
    starts, slots = torch.tensor([0, 2, 4, 5], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    check(y, x, a, b, rows, starts, slots, dtype, [1, 5, 3], meta)


def test_cpu_lora_refuses_metadata_of_another_shape():
    y, x, a, b = torch.zeros(2, 16), torch.zeros(2, 8), torch.zeros(2, 4, 8), torch.zeros(2, 16, 4)
    with pytest.raises(RuntimeError, match="slot metadata"):
        lora_add_cpu(y, x, a, b, torch.tensor([0]), torch.tensor([0, 1], dtype=torch.int32),
                     torch.tensor([0], dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32))
