"""Plain PyTorch reference for the quantized linears: de-quantize the weight, then `F.linear` in float32.

4-bit format (int4pack's own): `w[n, k] = (codes[n, k] - 8) * scale[n, k // group] + zero[n, k // group]`, codes in
0..15. A GGUF Q4_1 block (`d * q + m`) is `scale = d, zero = m + 8 d`; Q4_0 (`d * (q - 8)`) is `zero = 0`.
8-bit format (per output channel): `w[n, k] = codes[n, k] * scale[n]`, codes in -128..127.
Block formats (loom_kernels/quant/blocks.py): GGUF's Q4 / Q8_0 32-weight blocks with float16 scales."""
import torch
import torch.nn.functional as F


def dequantize_q4_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """codes `[N, K]` (0..15), scale/zero `[N, ceil(K / group)]` -> float32 weight `[N, K]`."""
    k = codes.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)[:, :k]
    z = zero.float().repeat_interleave(group, dim=1)[:, :k]
    return (codes.float() - 8) * s + z


def q4_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group: int) -> torch.Tensor:
    return F.linear(x.float(), dequantize_q4_ref(codes, scale, zero, group)).to(x.dtype)


def q8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), codes.float() * scale.float()[:, None]).to(x.dtype)


def dequantize_block_ref(w) -> torch.Tensor:
    """A `BlockQ4` / `BlockQ8` -> the float32 weight `[N, K]` its kernel computes with."""
    n = w.codes.shape[0]
    d = w.d.float().repeat_interleave(32, 1)
    if hasattr(w, "m"):  # Q4: byte i of a block holds weight i (low nibble) and weight 16 + i (high nibble)
        b = w.codes.reshape(n, -1, 16)
        q = torch.stack([b & 15, b >> 4], dim=2).reshape(n, -1).float()
        return (q * d + w.m.float().repeat_interleave(32, 1))[:, : w.k]
    return (w.codes.float() * d)[:, : w.k]


def block_linear_ref(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x.float(), dequantize_block_ref(w)).to(x.dtype)
