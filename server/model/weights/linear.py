"""CPU bf16 linear layers on oneDNN-prepacked weights.

A plain bf16 `F.linear` on CPU re-lays out the weight for oneDNN's AMX/AVX512-BF16 kernels on every call; for the
small activation batches of decoding that reorder costs as much as the product. Packing each weight once at load
time measured 1.6x faster per GEMM here (M=1..64, 1 thread). fp32 keeps plain `nn.Linear` (MKL) so float32 runs stay
bit-comparable with Hugging Face."""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("loom.model")


# activation -> oneDNN post-op (attr, scalars, algorithm), applied in the GEMM's epilogue instead of another pass
POST_OPS = {"none": ("none", [], ""), "relu": ("relu", [], ""), "gelu": ("gelu", [], "none"),
            "gelu_tanh": ("gelu", [], "tanh")}


class PackedLinear(nn.Module):
    """`activation` (a POST_OPS key) is fused into the product: oneDNN applies it to the fp32 accumulator before the
    one rounding to bf16."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post_op = POST_OPS[activation]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, *self.post_op)
        return out.reshape(*x.shape[:-1], self.out_features)


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.ops.mkldnn._is_mkldnn_bf16_supported() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack_linears(model: nn.Module) -> int:
    """Swap every bf16 CPU `nn.Linear` of `model` for a `PackedLinear`; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and can_prepack(child.weight):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    if swapped:
        log.info("prepacked linear weights for oneDNN", extra={"layers": swapped})
    return swapped
