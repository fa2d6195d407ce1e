"""Loom's kernels: one public op per kernel. Each op runs its Triton kernel on CUDA tensors (or on CPU tensors
when both TRITON_INTERPRET=1 and LOOM_KERNELS=triton are set, see backend.py) and its PyTorch reference otherwise.
Shapes are the contract (see shared/design.md)."""
import torch

from loom_kernels.activation.reference import gelu_tanh_and_mul_ref, silu_and_mul_ref
from loom_kernels.attention.cpu_decode import cpu_decode_available, paged_attention_decode_cpu
from loom_kernels.attention.reference import paged_attention_decode_ref, paged_attention_prefill_ref
from loom_kernels.backend import use_triton
from loom_kernels.fused_cpu.cpu_ops import (
    argmax_rows_available,
    argmax_rows_cpu,
    fused_cpu_available,
    rms_norm_cpu,
    rotary_cpu,
)
from loom_kernels.kv_write.reference import write_kv_ref
from loom_kernels.lora.cpu_lora import lora_add_cpu, lora_cpu_available
from loom_kernels.lora.reference import lora_add_ref
from loom_kernels.rms_norm.reference import rms_norm_ref
from loom_kernels.rotary.reference import rotary_ref

__all__ = [
    "argmax_rows", "gelu_tanh_and_mul", "lora_add", "paged_attention_decode", "paged_attention_prefill", "rms_norm",
    "rotary", "silu_and_mul", "write_kv"]


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """q `[B, H, D]` -> `[B, H, D]`: one query per sequence over its first `seq_lens[b]` cached tokens; with a
    sliding `window`, over the last `window` of them."""
    if use_triton(q):
        from loom_kernels.attention.decode_triton import paged_attention_decode_triton
        return paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, window)
    if q.device.type == "cpu" and cpu_decode_available():
        return paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale, window)
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, window)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            window: int | None = None) -> torch.Tensor:
    """q `[T, H, D]` -> `[T, H, D]`: varlen causal attention of each sequence's newest tokens over its cache; with a
    sliding `window`, the token at position p sees positions `p - window < j <= p` only."""
    if use_triton(q):
        from loom_kernels.attention.prefill_triton import paged_attention_prefill_triton
        return paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                              window)
    return paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, window)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k/v `[T, Hkv, D]` into the caches at `slot_mapping[T]`; slot -1 skips the token."""
    if use_triton(k):
        from loom_kernels.kv_write.triton_kernel import write_kv_triton
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, returns `(norm(x + residual), x + residual)`."""
    if use_triton(x):
        from loom_kernels.rms_norm.triton_kernel import rms_norm_triton
        return rms_norm_triton(x, weight, eps, residual)
    if fused_cpu_available(x):
        return rms_norm_cpu(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Neox-style rotary embedding applied in place to q `[T, H, D]` and k `[T, Hkv, D]`."""
    if use_triton(q):
        from loom_kernels.rotary.triton_kernel import rotary_triton
        return rotary_triton(q, k, positions, cos_sin_cache)
    if fused_cpu_available(q):
        return rotary_cpu(q, k, positions, cos_sin_cache)
    return rotary_ref(q, k, positions, cos_sin_cache)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of a 2-D tensor (first maximum; first NaN where a row has one)."""
    if argmax_rows_available(x):
        return argmax_rows_cpu(x)
    return x.argmax(-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :I]) * x[..., I:]`."""
    if use_triton(x):
        from loom_kernels.activation.triton_kernel import silu_and_mul_triton
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(x[..., :I]) * x[..., I:]` (GeGLU with the tanh-approximated GELU)."""
    if use_triton(x):
        from loom_kernels.activation.triton_kernel import gelu_tanh_and_mul_triton
        return gelu_tanh_and_mul_triton(x)
    return gelu_tanh_and_mul_ref(x)


def lora_add(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rows: torch.Tensor,
             seg_starts: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int) -> None:
    """Segmented LoRA, in place: `y [T, N] += (x [T, K] @ A[s].T) @ B[s].T` on the rows of each adapter segment.
    `a_stack [S, R, K]`, `b_stack [S, N, R]` (the scaling folded in); `rows [M]` int64 are the token rows that carry
    an adapter, grouped by segment; segment `g` is `rows[seg_starts[g]:seg_starts[g + 1]]` (int32) on slot
    `seg_slots[g]`; `max_seg_len` is the longest segment. On CPU: one C++ call (lora/cpu_lora.py)."""
    if use_triton(x):
        from loom_kernels.lora.triton_kernel import lora_add_triton
        return lora_add_triton(y, x, a_stack, b_stack, rows, seg_starts, seg_slots, max_seg_len)
    if lora_cpu_available(y, x, a_stack, b_stack):
        return lora_add_cpu(y, x, a_stack, b_stack, rows, seg_starts, seg_slots)
    return lora_add_ref(y, x, a_stack, b_stack, rows, seg_starts, seg_slots)
