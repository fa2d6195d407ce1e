"""4-bit and 8-bit weight-only linears on torch's CPU kernels (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`). They want what their layouts allow: out features a multiple of 16 and in features a multiple
of the group (32..256) for int4pack. Other shapes are padded here with zero weights (in features) or dropped rows
(out features), so any `[N, K]` works; the padding costs an activation copy only when K is not a multiple."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPS = (32, 64, 128, 256)


@dataclass
class Q4Packed:
    packed: torch.Tensor  # int4pack layout of codes `[N_pad, K_pad]`
    scales_zeros: torch.Tensor  # `[K_pad / group, N_pad, 2]` in the activation dtype the kernel runs in
    n: int
    k: int
    group: int


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_q4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
            dtype: torch.dtype = torch.bfloat16) -> Q4Packed:
    """codes `[N, K]` in 0..15, scale/zero `[N, ceil(K / group)]`: w = (codes - 8) * scale + zero."""
    if group not in GROUPS:
        raise ValueError(f"int4pack groups are {GROUPS}, got {group}")
    n, k = codes.shape
    n_pad, k_pad = pad_to(n, 16), pad_to(k, group)
    full = torch.full((n_pad, k_pad), 8, dtype=torch.int32)  # code 8 with scale/zero 0 is an exact zero weight
    full[:n, :k] = codes.to(torch.int32)
    sz = torch.zeros(k_pad // group, n_pad, 2, dtype=torch.float32)
    sz[: scale.shape[1], :n, 0] = scale.float().t()
    sz[: zero.shape[1], :n, 1] = zero.float().t()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(full, 1)
    return Q4Packed(packed, sz.to(dtype).contiguous(), n, k, group)


def q4_linear(x: torch.Tensor, w: Q4Packed) -> torch.Tensor:
    """x `[..., K]` -> `[..., N]` in x's dtype; the product runs in `w.scales_zeros.dtype` (bf16 is the fast one)."""
    flat = x.reshape(-1, w.k) if x.dim() != 2 else x
    if flat.dtype != w.scales_zeros.dtype:  # each skipped no-op saves ~1 us of dispatch, x 120 calls a step
        flat = flat.to(w.scales_zeros.dtype)
    k_pad = w.scales_zeros.shape[0] * w.group
    if k_pad != w.k:
        flat = F.pad(flat, (0, k_pad - w.k))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, w.packed, w.group, w.scales_zeros)
    if out.shape[1] != w.n:
        out = out[:, : w.n]
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w.n)


@dataclass
class Q8Packed:
    codes: torch.Tensor  # int8 `[N, K_pad]`
    scale: torch.Tensor  # `[N]` in the activation dtype the kernel runs in
    k: int


def pack_q8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Q8Packed:
    """codes int8 `[N, K]`, scale `[N]`: w = codes * scale. K is padded to 32 (the bf16 kernel crashes on K=70)."""
    k = codes.shape[1]
    return Q8Packed(F.pad(codes, (0, pad_to(k, 32) - k)).contiguous(), scale.to(dtype).contiguous(), k)


def q8_linear(x: torch.Tensor, w: Q8Packed) -> torch.Tensor:
    """x `[..., K]` -> `[..., N]` in x's dtype; the product runs in `w.scale.dtype`."""
    flat = x.reshape(-1, w.k) if x.dim() != 2 else x
    if flat.dtype != w.scale.dtype:
        flat = flat.to(w.scale.dtype)
    if w.codes.shape[1] != w.k:
        flat = F.pad(flat, (0, w.codes.shape[1] - w.k))
    out = torch.ops.aten._weight_int8pack_mm(flat, w.codes, w.scale)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], w.codes.shape[0])


def quantize_q4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit quantization of a float weight `[N, K]` (K padded to the group with zeros):
    codes, scale, zero in `pack_q4`'s convention."""
    n, k = w.shape
    g = F.pad(w.float(), (0, pad_to(k, group) - k)).reshape(n, -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    return codes.reshape(n, -1)[:, :k].to(torch.uint8), scale, lo + 8 * scale


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: codes `[N, K]`, scale `[N]` (float32)."""
    scale = (w.float().abs().amax(1) / 127).clamp_min(1e-12)
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale
