"""Quantized CPU linears and embedding that run a checkpoint's own blocks (loom_kernels/quant).

A `QuantLinear` can hold a weight in several forms ("backends") and picks one per call from its `plan`, a list of
(largest M, backend) chosen by calibration (server/model/weights/calibrate.py) within a memory budget. `gguf_blocks`
is a GGUF's tensor as the file stores it, any type Loom has a kernel for (loom_kernels/quant/kquants.py; `gguf_tiled`
runs the same blocks at large M, `gguf_q8` against int8 activations, and `gguf_q8k` the K-quants against int8
activations at large M);
`q4_blocks` / `q8_blocks` are Q4_0/Q4_1/Q8_0 codes re-laid for the older block kernel (blocks.py); `q4`/`q8` are
torch's int4pack / int8pack; bf16/fp32 dense copies are faster where the product is compute-bound (large M), at
several times the memory. `keep_only` drops every form the plan does not use and the source."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom_kernels.fused_cpu.decode_stack import StackLinear
from loom_kernels.quant import (
    Q8K_TYPES,
    GGUFBlocks,
    gguf_blocks,
    pack_block_q4,
    pack_block_q8,
    pack_q4,
    pack_q8,
    quantize_q8,
)
from server.model.weights.gguf_tensors import QTensor, code_block_form, dequantize_blocks

GGUF_FORMS = ("gguf_blocks", "gguf_tiled", "gguf_q8", "gguf_q8k")  # one GGUFBlocks, run by four kernels
INT8_FORMS = ("gguf_q8", "gguf_q8k")  # the forms that quantize their input to int8
BACKENDS = GGUF_FORMS + ("q4_blocks", "q8_blocks", "q4", "q8", "bf16", "bf16_packed", "f32")
QUANTIZED = GGUF_FORMS + ("q4_blocks", "q8_blocks", "q4", "q8")
FORM_OF_BACKEND = {**{b: b for b in GGUF_FORMS}, "q4_blocks": "q4_blocks", "q8_blocks": "q8_blocks", "q4": "q4",
                   "q8": "q8", "bf16": "dense", "f32": "dense", "bf16_packed": "mkldnn"}
BYTES_PER_WEIGHT = {"q4_blocks": 0.625, "q4": 0.625, "q8_blocks": 1.0625, "q8": 1.0, "bf16": 2.0,
                    "bf16_packed": 2.0, "f32": 4.0}  # with their scales; gguf_blocks: the file's own size
CODE_FORMS = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}  # GGUF types the int4pack / block kernels also run


def backends_for(source: QTensor, native_bf16: bool, fast_int8: bool, blocks: bool,
                 float_output: bool = False, int8_activations: bool = False) -> list[str]:
    """Candidates worth measuring: the source's own quantized forms (the block kernel first where it compiled; for
    GGUF blocks also against int8 activations where allowed), then dense copies. int8pack is left out where it is
    known to be catastrophically slow (AVX2 without AVX-512: 5-400x slower than fp32); bf16 ones where bf16 is
    emulated, and for a head that must write float32."""
    own = {"q4": ["q4_blocks"] * blocks + ["q4"], "q8": ["q8_blocks"] * blocks + ["q8"] * fast_int8}
    kind = source.kind
    if kind == "gguf":  # the file's blocks under the GGUF kernel; Q4_0/Q4_1/Q8_0 also under the code kernels
        segments = source.blocks.segments
        kind = CODE_FORMS.get(segments[0][1], "") if len(segments) == 1 else ""
        # the head too: its input rounded to int8 as llama.cpp rounds it, its logits still float32 sums
        q8 = ["gguf_q8"] * int8_activations
        q8 += ["gguf_q8k"] * (int8_activations and all(qtype in Q8K_TYPES for _, qtype in segments))
        own["gguf"] = (["gguf_blocks", "gguf_tiled"] + q8) * blocks + own.get(kind, [])
        kind = "gguf"
    return own.get(kind, []) + (["bf16", "bf16_packed"] if native_bf16 and not float_output else []) + ["f32"]


def form_bytes(source: QTensor, backend: str) -> int:
    """Resident bytes of one form of `source`, known before it is built (for the memory budget)."""
    if backend == "gguf_blocks":
        return source.nbytes()
    if backend in GGUF_FORMS[1:]:  # the same blocks, read another way
        return 0
    n, k = source.shape
    return int(n * k * BYTES_PER_WEIGHT[backend])


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
        self.decode_plan: list[tuple[int, str]] = []  # decode-only steps (the C++ stack): may take int8 activations
        self.quant_kind = f"gguf:{source.source}" if source.kind == "gguf" else source.kind  # plans group by it

    def build(self, backend: str) -> None:
        """Materialise one form of the weight (from the source codes, still held until `keep_only`)."""
        if backend in self.forms:
            return
        s = self.source
        if s.kind == "gguf" and backend in ("q4_blocks", "q8_blocks"):
            self.forms[backend] = code_block_form(s.blocks)
            return
        if s.kind == "gguf" and backend in ("q4", "q8"):
            s = s.as_codes()
        if backend in GGUF_FORMS:
            self.forms[backend] = s.blocks
        elif backend == "q4_blocks":
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

    def keep_only(self, plan: list[tuple[int, str]], decode_plan: list[tuple[int, str]] | None = None) -> None:
        """Install `plan` (every step) and `decode_plan` (decode-only steps; default `plan`), building their forms
        and dropping the rest and the source."""
        self.plan = sorted(plan)
        self.decode_plan = sorted(decode_plan) if decode_plan else self.plan
        used = {b for _, b in self.plan + self.decode_plan}
        for b in used:
            self.build(b)
        self.forms = {b: f for b, f in self.forms.items() if b in used}
        self.source = None

    def form(self, backend: str) -> StackLinear:
        """The weight in `backend`'s form, as the kernels run it (here and in the one-call CPU decode step)."""
        return StackLinear(FORM_OF_BACKEND[backend], self.forms[backend], self.bias, self.out_features)

    def run(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return self.form(backend)(x)

    def pick(self, m: int, decode: bool = False) -> str:
        """The backend for `m` rows: from `decode_plan` in a decode-only step, else from `plan`."""
        plan = self.decode_plan if decode else self.plan
        if m <= plan[0][0]:  # the common decode case: one comparison
            return plan[0][1]
        for limit, backend in plan:
            if m <= limit:
                return backend
        return plan[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_output:
            x = x.float()
        return self.run(x, self.pick(x.numel() // self.in_features))

    def nbytes(self) -> int:
        total = 0
        for f in self.forms.values():
            if isinstance(f, GGUFBlocks):
                total += f.nbytes
                continue
            ts = [f] if isinstance(f, torch.Tensor) else [v for v in vars(f).values() if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total

    def extra_repr(self) -> str:
        decode = f", decode_plan={self.decode_plan}" if self.decode_plan != self.plan else ""
        return (f"{self.in_features}->{self.out_features}, {self.quant_kind}, plan={self.plan}{decode}"
                + (", float32 out" if self.float_output else ""))


class QuantEmbedding(nn.Module):
    """Token embedding on the checkpoint's own codes or blocks: only the gathered rows are de-quantized."""

    def __init__(self, source: QTensor, dtype: torch.dtype):
        super().__init__()
        self.kind, self.dtype = source.kind, dtype
        self.codes, self.scale, self.zero = source.codes, source.scale, source.zero  # float32 scales: exact
        self.dense = source.dense.to(dtype) if source.kind == "dense" else None
        self.blocks = source.blocks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.embedding(ids, self.dense)
        if self.blocks is not None:
            (raw, qtype), = self.blocks.segments
            flat = ids.reshape(-1)
            w = dequantize_blocks(gguf_blocks(raw[flat], qtype, self.blocks.k))
            return w.to(self.dtype).reshape(*ids.shape, -1)
        codes = self.codes[ids].float()
        s = self.scale[ids].float().repeat_interleave(32, dim=-1)
        w = codes * s if self.kind == "q8" else (codes - 8) * s + self.zero[ids].float().repeat_interleave(32, dim=-1)
        return w.to(self.dtype)

    def nbytes(self) -> int:
        if self.blocks is not None:
            return self.blocks.nbytes
        ts = [t for t in (self.codes, self.scale, self.zero, self.dense) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, GGUFBlocks):
        return [raw for raw, _ in obj.segments]
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds (in every form it keeps), each storage once: a tied head shares the
    embedding's blocks."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        held = [t for form in getattr(mod, "forms", {}).values() for t in _tensors(form)]
        source = getattr(mod, "source", None)
        if isinstance(source, QTensor):  # before planning: the weight as read
            held += _tensors(source.blocks) if source.blocks is not None else _tensors(source)
        if isinstance(mod, QuantEmbedding):
            held += [t for t in (mod.codes, mod.scale, mod.zero, mod.dense) if t is not None]
            held += _tensors(mod.blocks) if mod.blocks is not None else []
        held += list(mod.parameters(recurse=False))  # buffers (rotary tables) are not weights
        for t in held:
            if t.device.type != "meta":
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
