"""Every CPU extension of Loom's kernels, built (or loaded from torch's build cache) at once: server/model/loader.py
calls this when it loads a model on CPU."""
from __future__ import annotations

import torch

from loom_kernels.attention.cpu_decode import cpu_decode_available
from loom_kernels.fused_cpu.cpu_ops import fused_cpu_available
from loom_kernels.fused_cpu.decode_stack import decode_stack_available
from loom_kernels.quant.blocks import block_kernels_available


def build_cpu_kernels() -> dict[str, bool]:
    """Build (or load the cached builds of) Loom's CPU extensions now; returns which are available. Each is otherwise
    built on its first use, and a build takes ~20-30 s: at start-up that only delays readiness, inside a request it
    stalls every stream (measured: a server's first mixed step waited 25 s for the paged-decode build after an
    upgrade changed its source)."""
    return {"paged_decode": cpu_decode_available(),
            "fused_ops": fused_cpu_available(torch.zeros(1, dtype=torch.bfloat16)),
            "decode_stack": decode_stack_available(), "blocks": block_kernels_available()}
