"""The LM head writes float32 logits on every path.

bf16 keeps 8 bits of mantissa: at the logit magnitudes of a small model (~10-20) two candidates closer than 0.06-0.125
round to the same value, greedy decoding then takes the first of a tie instead of the better token, and logprobs,
penalties and grammar masks all see the rounded values. The head is one GEMM per step over a few rows (only the rows
that are sampled), so computing it in float32 costs little: quantized heads run their float32 forms
(`QuantLinear.float_output`), dense reduced-precision heads a float32 copy on CPU and a float32-output GEMM on GPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.weights.quant import QuantLinear


class FloatHead(nn.Module):
    """A dense head of bf16/fp16 weights whose product accumulates and comes out in float32. On CPU it keeps a
    float32 copy of the weight (the head's bytes x2 more memory; oneDNN has no bf16 GEMM with a float32 output); on
    GPU it asks the GEMM for a float32 output and upcasts per call where torch has none."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        on_cpu = weight.device.type == "cpu"
        self.register_buffer("weight", weight.float() if on_cpu else weight, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float(), persistent=False)
        self.float_output_gemm = not on_cpu and has_float_output_gemm(weight)  # asked once, not every step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.linear(x.float(), self.weight, self.bias)
        return _float_gemm(x, self.weight, self.bias, self.float_output_gemm)


def has_float_output_gemm(weight: torch.Tensor) -> bool:
    """Whether torch multiplies `weight`'s dtype on its device into a float32 output (`torch.mm(..., out_dtype=)`)."""
    probe = weight[:1]
    try:
        torch.mm(probe, probe.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _float_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, float_output: bool) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if float_output:
        out = torch.mm(flat, weight.t(), out_dtype=torch.float32)
    else:  # no float32-output GEMM for this device or torch: upcast
        out = flat.float() @ weight.float().t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def install_float_head(model: nn.Module) -> bool:
    """Swap a reduced-precision dense `model.lm_head` for a `FloatHead` (after the weights are in: it copies them);
    returns whether it did. Float32 heads stay plain `nn.Linear` (bit-identical to Hugging Face); quantized heads
    were built with `float_output`."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.weight.dtype == torch.float32:
        return False
    model.lm_head = FloatHead(head)
    return True


def float_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` as float32 logits, whatever the head holds."""
    if isinstance(head, (FloatHead, QuantLinear)):
        return head(hidden).float()
    weight = head.weight
    if weight.dtype == torch.float32:
        return head(hidden.float())
    return _float_gemm(hidden, weight, head.bias, has_float_output_gemm(weight))
