"""Quantized CPU linears and embedding that run a checkpoint's own blocks (loom_kernels/quant).

A `QuantLinear` can hold a weight in several forms ("backends") and picks one per call from its `plan`, a list of
(largest M, backend) chosen by calibration (server/model/weights/calibrate.py): 4-bit int4pack or 8-bit int8pack with bf16
activations stream the fewest bytes (small M is bound by weight bandwidth), a dense bf16/fp32 copy is faster where
the product is compute-bound (large M). The block forms (`q4_blocks`, `q8_blocks`) are the checkpoint's own 32-weight blocks with their float16
scales under Loom's kernel (loom_kernels/quant/blocks.py); `q4`/`q8` are torch's int4pack / int8pack. `keep_only`
drops every form the plan does not use and the source codes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom_kernels.fused_cpu.decode_stack import StackLinear
from loom_kernels.quant import pack_block_q4, pack_block_q8, pack_q4, pack_q8, quantize_q8
from server.model.weights.gguf_tensors import QTensor

BACKENDS = ("q4_blocks", "q8_blocks", "q4", "q8", "bf16", "bf16_packed", "f32")
QUANTIZED = ("q4_blocks", "q8_blocks", "q4", "q8")
FORM_OF_BACKEND = {"q4_blocks": "q4_blocks", "q8_blocks": "q8_blocks", "q4": "q4", "q8": "q8", "bf16": "dense",
                   "f32": "dense", "bf16_packed": "mkldnn"}


def backends_for(source: QTensor, native_bf16: bool, fast_int8: bool, blocks: bool,
                 float_output: bool = False) -> list[str]:
    """Candidates worth measuring: the source's own quantized forms (the block kernel first where it compiled),
    then dense copies. int8pack is left out where it is known to be catastrophically slow (AVX2 without AVX-512:
    5-400x slower than fp32); bf16 ones where bf16 is emulated, and for a head that must write float32."""
    own = {"q4": ["q4_blocks"] * blocks + ["q4"], "q8": ["q8_blocks"] * blocks + ["q8"] * fast_int8}
    return own.get(source.kind, []) + (["bf16", "bf16_packed"] if native_bf16 and not float_output else []) + ["f32"]


class QuantLinear(nn.Module):
    """`float_output` (the LM head): every form takes and returns float32 (logits keep their precision; see
    server/model/weights/head.py), so the plan chooses among the block kernels, int4/int8pack in float32 and f32."""

    def __init__(self, source: QTensor, bias: torch.Tensor | None = None, float_output: bool = False):
        super().__init__()
        self.float_output = float_output
        self.out_features, self.in_features = source.shape
        self.source: QTensor | None = source
        self.forms: dict[str, object] = {}
        if bias is not None and float_output:
            bias = bias.float()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.plan: list[tuple[int, str]] = []
        self.quant_kind = source.kind

    def build(self, backend: str) -> None:
        """Materialise one form of the weight (from the source codes, still held until `keep_only`)."""
        if backend in self.forms:
            return
        s = self.source
        if backend == "q4_blocks":
            self.forms["q4_blocks"] = pack_block_q4(s.codes, s.scale, s.zero)
        elif backend == "q8_blocks":
            self.forms["q8_blocks"] = pack_block_q8(s.codes, s.scale)
        elif backend == "q4":
            self.forms["q4"] = pack_q4(s.codes, s.scale, s.zero, 32, self.act_dtype)
        elif backend == "q8":  # int8pack scales per output row: re-scale the per-32 blocks (exact if they agree)
            self.forms["q8"] = pack_q8(*quantize_q8(s.dequantize()), self.act_dtype)
        elif backend == "f32":
            self.forms["f32"] = s.dequantize().contiguous()
        elif backend == "bf16":
            self.forms["bf16"] = s.dequantize().to(torch.bfloat16)
        elif backend == "bf16_packed":
            self.forms["bf16_packed"] = torch.ops.mkldnn._reorder_linear_weight(s.dequantize().to(torch.bfloat16))
        else:
            raise ValueError(f"unknown linear backend {backend!r}")

    @property
    def act_dtype(self) -> torch.dtype:
        """The activation dtype int4pack/int8pack run in: bf16 is their fast one."""
        return torch.float32 if self.float_output else torch.bfloat16

    def keep_only(self, plan: list[tuple[int, str]]) -> None:
        self.plan = sorted(plan)
        for b in {b for _, b in plan}:
            self.build(b)
        self.forms = {b: f for b, f in self.forms.items() if any(b == p for _, p in plan)}
        self.source = None

    def form(self, backend: str) -> StackLinear:
        """The weight in `backend`'s form, as the kernels run it (here and in the one-call CPU decode step)."""
        return StackLinear(FORM_OF_BACKEND[backend], self.forms[backend], self.bias, self.out_features)

    def run(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return self.form(backend)(x)

    def pick(self, m: int) -> str:
        if m <= self.plan[0][0]:  # the common decode case: one comparison
            return self.plan[0][1]
        for limit, backend in self.plan:
            if m <= limit:
                return backend
        return self.plan[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_output:
            x = x.float()
        return self.run(x, self.pick(x.numel() // self.in_features))

    def nbytes(self) -> int:
        total = 0
        for f in self.forms.values():
            ts = [f] if isinstance(f, torch.Tensor) else [v for v in vars(f).values() if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, {self.quant_kind}, plan={self.plan}"
                + (", float32 out" if self.float_output else ""))


class QuantEmbedding(nn.Module):
    """Token embedding on the checkpoint's own codes: only the gathered rows are de-quantized."""

    def __init__(self, source: QTensor, dtype: torch.dtype):
        super().__init__()
        self.kind, self.dtype = source.kind, dtype
        self.codes, self.scale, self.zero = source.codes, source.scale, source.zero  # float32 scales: exact
        self.dense = source.dense.to(dtype) if source.kind == "dense" else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.embedding(ids, self.dense)
        codes = self.codes[ids].float()
        s = self.scale[ids].float().repeat_interleave(32, dim=-1)
        w = codes * s if self.kind == "q8" else (codes - 8) * s + self.zero[ids].float().repeat_interleave(32, dim=-1)
        return w.to(self.dtype)

    def nbytes(self) -> int:
        ts = [t for t in (self.codes, self.scale, self.zero, self.dense) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)
