"""The segmented LoRA product on CPU in C++ (cpu_lora.cpp, its loops in cpu_lora.h): one call per linear for all the
step's segments instead of the reference's ~5 torch ops per segment (~120 wrapped linears per step make that
dispatch, not arithmetic, the cost of a mixed-adapter step). Segments of a few rows (decode) run as float32 dot
products rounded once into `y` (the reference rounds the shrink, the expand and the sum); a prompt's long segment
runs as ATen's float32 GEMM. The decode stack also reads each slot's `lora_slot_meta`, so it streams only the
weights an adapter holds, not the zero padding of the slot stacks. Without a compiler the reference serves."""
from __future__ import annotations

import torch

from loom_kernels.backend import kernel_backend
from loom_kernels.cpu.build import LORA

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 64  # outputs per window of `lora_slot_meta` (LORA_CHUNK in cpu_lora.h)


def lora_cpu_available(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> bool:
    """CPU tensors of one dtype, 2-D activations, the slot stacks contiguous, and the extension built."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and y.dtype == x.dtype == a_stack.dtype == b_stack.dtype
            and x.dim() == 2 and y.dim() == 2 and x.stride(1) == 1 and y.stride(1) == 1
            and a_stack.is_contiguous() and b_stack.is_contiguous()
            and kernel_backend().mode != "torch" and LORA() is not None)


def lora_add_cpu(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rows: torch.Tensor,
                 seg_starts: torch.Tensor, seg_slots: torch.Tensor, slot_meta: torch.Tensor | None = None) -> None:
    """As `lora_add_ref`; `slot_meta` `[S, 1 + 2 * ceil(N / 64)]`: each slot's `lora_slot_meta`, if kept."""
    LORA().lora_add(y, x, a_stack, b_stack, rows, seg_starts, seg_slots, slot_meta)


def lora_slot_meta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What one slot's `a [R, K]` / `b [N, R]` hold, so the C++ reads only that: `[rank, lo_0, hi_0, lo_1, ...]`
    int32, the number of A's leading rows up to its last non-zero one, then per CHUNK outputs the span of B's
    columns that are not zero (a fused projection's B is block-diagonal over its parts: each part's outputs use its
    own rank columns). All-zero spans are (0, 0)."""
    nonzero_rows = a.ne(0).any(1).nonzero()
    rank = int(nonzero_rows[-1]) + 1 if nonzero_rows.numel() else 0
    n, r = b.shape
    chunks = -(-n // CHUNK)
    nz = torch.zeros(chunks * CHUNK, r, dtype=torch.bool, device=b.device)
    nz[:n] = b.ne(0)
    cols = nz.view(chunks, CHUNK, r).any(1)
    idx = torch.arange(r, device=b.device)
    hi = torch.where(cols, idx + 1, 0).amax(1)
    lo = torch.where(hi > 0, torch.where(cols, idx, r).amin(1), 0)
    return torch.cat([torch.tensor([rank], device=b.device), torch.stack([lo, hi], 1).flatten()]).to(torch.int32)
