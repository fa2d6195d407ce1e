"""RMSNorm (+ residual add), rotary embedding and the greedy sampler's row argmax for CPU serving in C++, one call each instead of the reference's
~10 and ~20 small torch ops (at batch 1 a decode step is ~600 such ops: dispatch, not arithmetic, is the cost).
Same roundings as the references (fp32 math, rounded to the tensor's dtype where they round); used for bf16/fp16
tensors, so float32 runs keep the reference and stay bit-identical to Hugging Face. The argmax rounds nothing and
serves float32 logits (torch's takes 0.68 ms for 32 x 49,152 here, 12x a vectorized max). The C++ is cpu_ops.cpp (its
shared part cpu_ops.h), built once by loom_kernels/cpu/build.py; without a compiler the references serve."""
from __future__ import annotations

import torch

from loom_kernels.backend import kernel_backend
from loom_kernels.cpu.build import FUSED_OPS

_compiled = FUSED_OPS.build  # the extension (cpu_ops.cpp) per ISA level, built once per process


def fused_cpu_available(t: torch.Tensor) -> bool:
    """For reduced-precision CPU tensors only (float32 keeps the references, bit-identical to Hugging Face)."""
    return (t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)
            and kernel_backend().mode != "torch" and FUSED_OPS() is not None)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    res = None if residual is None else residual.reshape(-1, shape[-1])
    outs = FUSED_OPS().rms_norm(flat, weight.to(x.dtype).contiguous(), res, eps)
    if residual is None:
        return outs[0].reshape(shape)
    return outs[0].reshape(shape), outs[1].reshape(shape)


def rotary_cpu(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    FUSED_OPS().rotary(q, k, positions, cos_sin_cache)


def argmax_rows_available(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0
            and kernel_backend().mode != "torch" and FUSED_OPS() is not None)


def argmax_rows_cpu(x: torch.Tensor) -> torch.Tensor:
    return FUSED_OPS().argmax_rows(x)
