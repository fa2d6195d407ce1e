"""GGUF-style 32-weight blocks on CPU: our own small-M GEMM over a checkpoint's Q4 and Q8_0 blocks as stored.

A decode step at a few sequences is bound by the bytes of weight it streams. torch's `_weight_int4pack_mm_for_cpu`
and `_weight_int8pack_mm` reach ~15-19 GB/s at M=1 here and int8pack needs per-row scales (a Q8_0 head re-quantized
once more); this kernel reads the blocks in one pass per row with the fp16 scales the file has and keeps up to four
activation rows in flight per weight load (larger M in passes). Paths chosen at compile time (`-march=native`,
cached per CPU): Q4 with bf16 activations on AVX512-BF16 dot products (nibbles -> bf16 through a `vpermw` table),
otherwise the codes widened to float32 in registers (AVX-512 `vpermps` table, AVX2 + F16C) or a plain loop.

Formats (`w[n, k]`, group g = k // 32, j = k % 32):
- `BlockQ4`: codes uint8 `[N, G * 16]`, byte 16 g + i holds weight 32 g + i in its low and 32 g + 16 + i in its
  high nibble (llama.cpp's Q4 order); d, m float16 `[N, G]`: `w = q * d + m` (Q4_1 as stored; Q4_0 has m = -8 d).
- `BlockQ8`: codes int8 `[N, G * 32]`, d float16 `[N, G]`: `w = q * d` (Q8_0 as stored).
K is padded to whole blocks with zero weights; the kernel pads the activations to match."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom_kernels.cpu.build import BLOCKS

BLOCK = 32


@dataclass
class BlockQ4:
    codes: torch.Tensor  # uint8 [N, G * 16]
    d: torch.Tensor  # float16 [N, G]
    m: torch.Tensor  # float16 [N, G]
    k: int


@dataclass
class BlockQ8:
    codes: torch.Tensor  # int8 [N, G * 32]
    d: torch.Tensor  # float16 [N, G]
    k: int


def _pad_k(t: torch.Tensor, value: int) -> torch.Tensor:
    k = t.shape[1]
    return F.pad(t, (0, -(-k // BLOCK) * BLOCK - k), value=value)


def pack_block_q4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> BlockQ4:
    """codes `[N, K]` in 0..15, scale/zero `[N, ceil(K / 32)]` in int4pack's convention `w = (q - 8) * scale + zero`
    (a GGUF Q4_1 block is scale = d, zero = m + 8 d): stored as d = scale, m = zero - 8 scale in float16, exact for
    a GGUF's own blocks."""
    n, k = codes.shape
    q = _pad_k(codes.to(torch.uint8), 0).reshape(n, -1, 2, 16)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1).contiguous()
    d = scale.double()
    return BlockQ4(packed, d.to(torch.float16).contiguous(), (zero.double() - 8 * d).to(torch.float16).contiguous(), k)


def pack_block_q8(codes: torch.Tensor, scale: torch.Tensor) -> BlockQ8:
    """int8 codes `[N, K]`, scale `[N, ceil(K / 32)]` (a Q8_0 block's d): `w = q * d`."""
    return BlockQ8(_pad_k(codes.to(torch.int8), 0).contiguous(), scale.to(torch.float16).contiguous(), codes.shape[1])


_build = BLOCKS.build  # the extension (blocks.cpp) per ISA level, built once per process


def _compiled(isa: str | None = None):
    """`isa`: an ISA level below the CPU's own (platform.ISA_LEVELS); default: the forced one."""
    return BLOCKS(isa)


def block_kernels_available() -> bool:
    return _compiled() is not None


def _run(x: torch.Tensor, w: BlockQ4 | BlockQ8, kind: int, m: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != w.k:
        raise ValueError(f"the weight takes {w.k} input features, got {x.shape[-1]}")
    out = _compiled().block_linear(x.reshape(-1, w.k), w.codes, w.d, m, kind)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def block_q4_linear(x: torch.Tensor, w: BlockQ4) -> torch.Tensor:
    """x `[..., K]` -> `[..., N]` in x's dtype, accumulated in float32."""
    return _run(x, w, 0, w.m)


def block_q8_linear(x: torch.Tensor, w: BlockQ8) -> torch.Tensor:
    return _run(x, w, 1, w.d)
