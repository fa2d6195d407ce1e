"""The kernel tests call the Triton kernels directly: compiled on a GPU, elsewhere in the Triton interpreter.

`@triton.jit` decides between the two when a kernel module is imported, so TRITON_INTERPRET=1 is set here, before
any test imports one. It leaks into the rest of a shared pytest process, which is harmless: on CPU tensors the
public ops also need LOOM_KERNELS=triton to leave the torch reference (see backend.py), so the server's tests keep
the fast path.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
