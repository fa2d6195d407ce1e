"""Segmented LoRA: the Triton shrink/expand kernels against the PyTorch reference, and the reference against a plain
per-token product: several adapters and slots, ranks below and above the tile, rows in any order, segments longer
than a tile, tokens without an adapter left untouched."""
import pytest
import torch

from loom_kernels.lora.reference import lora_add_ref
from loom_kernels.lora.triton_kernel import lora_add_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-2, "rtol": 2e-2},
       torch.bfloat16: {"atol": 6e-2, "rtol": 4e-2}}


def case(t: int, k: int, n: int, rank: int, slots: int, token_slot: list[int], dtype=torch.float32, seed: int = 0):
    """Inputs for `token_slot` (a slot per token, -1: the base model): segments grouped by slot."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(DEVICE, dtype)
    y = torch.randn(t, n, generator=g).to(DEVICE, dtype)
    a = (torch.randn(slots, rank, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(slots, n, rank, generator=g).to(DEVICE, dtype)
    order = sorted((s, i) for i, s in enumerate(token_slot) if s >= 0)
    rows = torch.tensor([i for _, i in order], dtype=torch.long, device=DEVICE)
    seg_slots, starts = [], [0]
    for pos, (s, _) in enumerate(order):
        if not seg_slots or seg_slots[-1] != s:
            if seg_slots:
                starts.append(pos)
            seg_slots.append(s)
    starts.append(len(order))
    lens = [hi - lo for lo, hi in zip(starts, starts[1:])]
    return (y, x, a, b, rows, torch.tensor(starts if seg_slots else [0], dtype=torch.int32, device=DEVICE),
            torch.tensor(seg_slots, dtype=torch.int32, device=DEVICE), max(lens, default=0))


def per_token(y, x, a, b, token_slot):
    out = y.clone().float()
    for i, s in enumerate(token_slot):
        if s >= 0:
            out[i] += (x[i].float() @ a[s].float().t()) @ b[s].float().t()
    return out


SHAPES = [  # (tokens, K, N, rank, slots, slot per token)
    (5, 64, 96, 8, 2, [0, -1, 1, 0, 1]),
    (40, 72, 130, 24, 3, [i % 4 - 1 for i in range(40)]),  # rank above one 16-wide tile, N not a multiple of the tile
    (37, 48, 48, 4, 1, [0] * 37),  # one segment of three tiles
    (6, 32, 40, 16, 4, [-1] * 6),  # no adapter at all
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_per_token_product(shape):
    t, k, n, rank, slots, token_slot = shape
    y, x, a, b, rows, starts, seg_slots, _ = case(t, k, n, rank, slots, token_slot)
    expected = per_token(y, x, a, b, token_slot)
    lora_add_ref(y, x, a, b, rows, starts, seg_slots)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    t, k, n, rank, slots, token_slot = shape
    y, x, a, b, rows, starts, seg_slots, longest = case(t, k, n, rank, slots, token_slot, dtype)
    expected = y.clone()
    lora_add_ref(expected, x, a, b, rows, starts, seg_slots)
    untouched = y.clone()
    lora_add_triton(y, x, a, b, rows, starts, seg_slots, longest, block_n=32, block_k=32)
    torch.testing.assert_close(y, expected, **TOL[dtype])
    base_rows = [i for i, s in enumerate(token_slot) if s < 0]
    assert torch.equal(y[base_rows], untouched[base_rows])  # the base model's tokens are not written at all
