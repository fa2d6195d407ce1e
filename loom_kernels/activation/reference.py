"""PyTorch references of the gated MLP activations: SiLU (Llama) and tanh-GELU (Gemma's GeGLU)."""
import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`x[..., :I]` is the gate, `x[..., I:]` the up projection: returns `silu(gate) * up`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`gelu(gate, approximate="tanh") * up`, as Hugging Face's `gelu_pytorch_tanh` gated MLPs compute it."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
