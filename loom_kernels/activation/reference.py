"""PyTorch reference of the SiLU-gated MLP activation."""
import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`x[..., :I]` is the gate, `x[..., I:]` the up projection: returns `silu(gate) * up`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
