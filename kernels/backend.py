"""Backend choice shared by every public op.

CUDA tensors always take the Triton kernels. CPU tensors take the PyTorch reference (the CPU serving path) unless
*both* `TRITON_INTERPRET=1` and `LOOM_KERNELS=triton` are set: the interpreter is 100-1000x slower than torch, and
`TRITON_INTERPRET=1` alone is set by `kernels/conftest.py` for the kernel tests, which may share a pytest process
with the server tests; those must keep the fast reference. `LOOM_KERNELS=torch` forces the reference everywhere.
"""
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("LOOM_KERNELS", "")
    if mode == "torch":  # escape hatch: force the reference everywhere
        return False
    if t.is_cuda:
        return True
    return mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
