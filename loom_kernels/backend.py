"""Backend choice shared by every public op, resolved once per process.

CUDA tensors always take the Triton kernels. CPU tensors take the PyTorch reference (the CPU serving path) unless
*both* `TRITON_INTERPRET=1` and `LOOM_KERNELS=triton` are set: the interpreter is 100-1000x slower than torch, and
`TRITON_INTERPRET=1` alone is set by the test configuration for the kernel tests, which share a pytest process with
the server tests; those must keep the fast reference. `LOOM_KERNELS=torch` forces the reference everywhere.
Tests that switch backends change the environment and call `reset()`."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelBackend:
    mode: str  # "auto", "torch" (references everywhere) or "triton" (Triton on CPU too, with the interpreter)
    interpret: bool  # TRITON_INTERPRET=1

    def use_triton(self, t: torch.Tensor) -> bool:
        if self.mode == "torch":
            return False
        if t.is_cuda:
            return True
        return self.mode == "triton" and self.interpret


@functools.cache
def kernel_backend() -> KernelBackend:
    return KernelBackend(os.environ.get("LOOM_KERNELS", "auto") or "auto", os.environ.get("TRITON_INTERPRET") == "1")


def use_triton(t: torch.Tensor) -> bool:
    return kernel_backend().use_triton(t)


def reset() -> None:
    """Read the environment again on the next op (tests that switch backends)."""
    kernel_backend.cache_clear()
