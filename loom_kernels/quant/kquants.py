"""llama.cpp GGUF weights run as stored: a small-M GEMM and a de-quantizer that read a GGUF tensor's raw block bytes.

Types: the 32-weight blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the 256-weight K-quant superblocks Q4_K, Q5_K, Q6_K (what
Q4_K_M / Q5_K_M / Q6_K / Q8_0 files mix). A weight is a list of row segments, each `(raw, qtype)` with raw the
tensor's bytes as uint8 `[rows, row_bytes]`: a fused projection (q|k|v, gate|up) may join rows of different types,
and its output features are the segments' rows in order.

The C++ kernel (kquants.h) streams each weight row once per pass of up to four activation rows (larger M in
passes), widening its codes to float32 in registers straight from the bytes (no float32 copy of the weight), and
accumulates in float32: each scale group's sum of code * x is scaled once, and the min terms (Q4_1, Q5_1, Q4_K,
Q5_K; Q4_0 / Q5_0's -8 d / -16 d) are taken against per-sub-block activation sums computed once per call. Threads
split the output rows (OpenMP, 16-row tasks). Paths chosen at compile time: AVX-512, AVX2 + FMA + F16C, plain C++.
De-quantization is bit for bit gguf-py's `gguf.quants.dequantize`.

That GEMM decodes every weight once per 4 activation rows, so at large M it is bound by decoding. `gguf_linear_tiled`
decodes each weight once per call instead: each thread de-quantizes a panel of rows (~1 MB of float32) into its own
reused buffer and multiplies all the activations by it in a float32 matmul, panel after panel. It loses at small M
(it writes and re-reads the weight as float32); where the two cross depends on the CPU (M ~ 20 on a 2-core AVX2
one), so the caller picks per batch size."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loom_kernels.cpu.build import KQUANTS

# ggml type name -> (ggml type id, weights per block, bytes per block), as ggml-common.h lays the blocks out.
_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}
GGUF_KERNEL_TYPES: tuple[str, ...] = tuple(_TYPES)
Q8K_TYPES: tuple[str, ...] = ("Q4_K", "Q5_K", "Q6_K")  # the types gguf_linear_q8k runs


def _type(qtype: str) -> tuple[int, int, int]:
    try:
        return _TYPES[qtype]
    except KeyError:
        raise ValueError(f"GGUF type {qtype!r} is not one the kernel runs; one of {', '.join(GGUF_KERNEL_TYPES)}") \
            from None


def ggml_type_id(qtype: str) -> int:
    """ggml's number for the type (gguf.GGMLQuantizationType's value)."""
    return _type(qtype)[0]


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one row of `k` weights of `qtype`; `k` must be a whole number of the type's blocks."""
    _, block, size = _type(qtype)
    if k <= 0 or k % block:
        raise ValueError(f"{qtype} rows hold whole {block}-weight blocks: K = {k} is not a positive multiple of "
                         f"{block}")
    return k // block * size


@dataclass
class GGUFBlocks:
    """A weight `[N, k]` as GGUF blocks: segments `(raw uint8 [n_i, row_bytes(qtype_i, k)], qtype_i)` whose rows,
    in order, are the N output features."""
    segments: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    k: int = 0

    @property
    def n(self) -> int:
        return sum(raw.shape[0] for raw, _ in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(raw.numel() for raw, _ in self.segments)

    @property
    def qtypes(self) -> list[str]:
        return [qtype for _, qtype in self.segments]


def gguf_blocks(raw: torch.Tensor, qtype: str, k: int) -> GGUFBlocks:
    """One segment: a GGUF tensor's bytes (uint8, `[rows, row_bytes]` or flat) as a weight of `k` input features."""
    size = row_bytes(qtype, k)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"the raw blocks must be a uint8 tensor, got {getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.dim() == 1 and raw.numel() % size == 0:
        raw = raw.reshape(-1, size)
    if raw.dim() != 2 or raw.shape[1] != size:
        raise ValueError(f"{qtype} rows of K = {k} weights take {size} bytes; got raw blocks of shape "
                         f"{tuple(raw.shape)}")
    return GGUFBlocks([(raw.contiguous(), qtype)], k)


def concat_gguf_blocks(parts: Sequence[GGUFBlocks]) -> GGUFBlocks:
    """The parts' rows one after another (a fused projection), each part keeping its types."""
    if not parts:
        raise ValueError("concat_gguf_blocks needs at least one part")
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise ValueError(f"the parts take different input features: {[p.k for p in parts]}")
    return GGUFBlocks([seg for p in parts for seg in p.segments], k)


def _compiled(isa: str | None = None):
    """The extension (kquants.cpp), built once per process and ISA level; None without a compiler. `isa`: a level
    below the CPU's own (platform.ISA_LEVELS); default: the forced one."""
    return KQUANTS(isa)


def gguf_kernels_available() -> bool:
    return _compiled() is not None


def _ext():
    ext = _compiled()
    if ext is None:
        raise RuntimeError("the GGUF block kernels need a C++ compiler (the kquants extension could not be built)")
    return ext


def _args(w: GGUFBlocks) -> tuple[list[torch.Tensor], list[int]]:
    """The extension's (segments, ggml type ids), each segment checked against its type and K."""
    if not w.segments:
        raise ValueError("a GGUF weight needs at least one segment")
    for raw, qtype in w.segments:
        size = row_bytes(qtype, w.k)
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != size:
            raise ValueError(f"a {qtype} segment of K = {w.k} needs uint8 rows of {size} bytes, got "
                             f"{raw.dtype} {tuple(raw.shape)}")
    return [raw for raw, _ in w.segments], [ggml_type_id(qtype) for _, qtype in w.segments]


def _run_linear(name: str, x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """The extension's GEMM `name` over x's rows, shaped back as x's leading dimensions."""
    if x.shape[-1] != w.k:
        raise ValueError(f"the weight takes {w.k} input features, got {x.shape[-1]}")
    raws, types = _args(w)
    out = getattr(_ext(), name)(x.reshape(-1, w.k), raws, types, w.k)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def gguf_linear(x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """x `[..., K]` (float32 / bfloat16 / float16) -> `[..., N]` in x's dtype, accumulated in float32. Streams the
    weight once per 4 activation rows: the fast one at small M (decode)."""
    return _run_linear("gguf_linear", x, w)


def gguf_linear_tiled(x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """`gguf_linear` for large M (prefill): panels of weight rows de-quantized (bit for bit `dequantize_gguf`'s) into
    a reused float32 buffer per thread, each multiplied by all the activations in a float32 matmul (bfloat16 /
    float16 activations widened first, the output rounded once to x's dtype). No dense copy of the weight is kept."""
    return _run_linear("gguf_linear_tiled", x, w)


def gguf_linear_q8(x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """`gguf_linear` against x quantized to int8 per 32 values (scale max|x| / 127, round half to even), as llama.cpp
    runs its CPU matmuls: exactly `q8_activations(x) @ dequantize_gguf(w).T` up to float32 summation order, with
    integer dot products per sub-block (kquants_q8.h). Faster where decoding codes to float bounds the GEMM; the
    activations' rounding is its cost, so callers offer it only where int8 activations are allowed."""
    return _run_linear("gguf_linear_q8", x, w)


def gguf_linear_q8k(x: torch.Tensor, w: GGUFBlocks) -> torch.Tensor:
    """The K-quants (every segment Q4_K, Q5_K or Q6_K) against x quantized to int8 per 256 values (llama.cpp's Q8_K):
    exactly `q8_activations(x, 256) @ dequantize_gguf(w).T` up to float32 summation order. Each superblock's integer
    scales enter the integer sums (kquants_q8k.h): the large-M (prompt) GEMM where int8 activations are allowed."""
    bad = sorted({qtype for qtype in w.qtypes if qtype not in Q8K_TYPES})
    if bad:
        raise ValueError(f"gguf_linear_q8k runs {', '.join(Q8K_TYPES)} weights, not {', '.join(bad)}")
    return _run_linear("gguf_linear_q8k", x, w)


def q8_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x `[..., K]` as gguf_linear_q8 (block 32) or gguf_linear_q8k (block 256) sees it: each `block` values
    (zero-padded) rounded to int8 codes times max|x| / 127, in float32. The reference for those kernels."""
    k = x.shape[-1]
    flat = x.reshape(-1, k).float()
    pad = (-k) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(flat.shape[0], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # IEEE 127 / amax as the kernel divides (torch's scalar / tensor is a reciprocal times 127: other bits)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv)
    out = (codes * (amax / 127.0)).reshape(flat.shape[0], -1)[:, :k]
    return out.reshape(x.shape)


def dequantize_gguf(w: GGUFBlocks) -> torch.Tensor:
    """The weight as float32 `[N, K]`, bit for bit what `gguf.quants.dequantize` gives."""
    raws, types = _args(w)
    return _ext().gguf_dequantize(raws, types, w.k)
