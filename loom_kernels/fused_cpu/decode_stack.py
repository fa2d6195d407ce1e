"""A whole decode step of a Llama-family decoder stack on CPU in one C++ call.

At one to a few sequences a CPU decode step is bound by dispatch, not arithmetic: the Python layer loop issues ~25
torch ops per layer (~750 for a 30-layer model) at a few microseconds each, as much time as the 4-bit matmuls take.
Here the layer loop, the RMSNorms, rotary, the KV-cache write, paged attention, SiLU·mul and the residual adds run
in C++ around the same ATen matmuls the Python path calls (int4pack / int8pack / dense / oneDNN-packed), so only the
kernels' own work remains. The reference is `decode_stack_ref`: the same step through the public ops, as
server/model/llama.py runs it (and, per layer, the newer families' variations: Qwen3's q/k head norms, SmolLM3's
layers without rotary, Phi-3's partial rotary, sliding windows; Gemma 3's layer: a norm on both sides of each
sublayer, GeGLU and a second rotary table for its local layers). Decode-only batches; prefill keeps the Python path
(there the matmuls dominate). A linear that carries LoRA slot stacks adds its adapter rows' deltas after the base
product (lora/cpu_lora.h), so steps that mix adapters and the base model stay on the stack too."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom_kernels.backend import kernel_backend
from loom_kernels.cpu.build import DECODE_STACK
from loom_kernels.lora.reference import lora_add_ref, lora_segments
from loom_kernels.quant import (
    BlockQ4,
    BlockQ8,
    GGUFBlocks,
    Q4Packed,
    Q8Packed,
    block_q4_linear,
    block_q8_linear,
    gguf_linear,
    gguf_linear_q8,
    gguf_linear_q8k,
    gguf_linear_tiled,
    q4_linear,
    q8_linear,
)
from loom_kernels.quant.kquants import ggml_type_id

KINDS = {"q4": 0, "q8": 1, "dense": 2, "mkldnn": 3, "q4_blocks": 4, "q8_blocks": 5, "gguf_blocks": 6, "gguf_tiled": 7,
         "gguf_q8": 8, "gguf_q8k": 9}
GGUF_KINDS = ("gguf_blocks", "gguf_tiled", "gguf_q8", "gguf_q8k")


@dataclass
class StackLinear:
    """One linear in the form the step runs it: `q4` (Q4Packed), `q8` (Q8Packed), `q4_blocks` / `q8_blocks`
    (BlockQ4 / BlockQ8), `gguf_blocks` (GGUFBlocks: a GGUF file's blocks as stored, segments of mixed types),
    `gguf_tiled` (the same GGUFBlocks through `gguf_linear_tiled`, the large-M GEMM), `gguf_q8` (through
    `gguf_linear_q8`, activations quantized to int8), `gguf_q8k` (K-quants through `gguf_linear_q8k`, activations
    quantized per 256), `dense` (a weight `[N, K]`,
    any dtype: the input is cast to it) or `mkldnn` (a oneDNN-packed bf16 weight with its `out_features`).
    `lora_a` `[S, R, K]` / `lora_b` `[S, N, R]` / `lora_meta` (each slot's `lora_slot_meta`): the LoRA slot stacks
    of a linear that carries adapters, held (not copied) by the stack; `__call__` is the base product only."""
    kind: str
    weight: Q4Packed | Q8Packed | BlockQ4 | BlockQ8 | GGUFBlocks | torch.Tensor
    bias: torch.Tensor | None = None
    out_features: int = 0
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    lora_meta: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gguf_blocks":
            out = gguf_linear(x, self.weight)
        elif self.kind == "gguf_tiled":
            out = gguf_linear_tiled(x, self.weight)
        elif self.kind == "gguf_q8":
            out = gguf_linear_q8(x, self.weight)
        elif self.kind == "gguf_q8k":
            out = gguf_linear_q8k(x, self.weight)
        elif self.kind == "q4_blocks":
            out = block_q4_linear(x, self.weight)
        elif self.kind == "q8_blocks":
            out = block_q8_linear(x, self.weight)
        elif self.kind == "q4":
            out = q4_linear(x, self.weight)
        elif self.kind == "q8":
            out = q8_linear(x, self.weight)
        elif self.kind == "mkldnn":
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, None, "none", [], "")
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@dataclass
class StackLayer:
    """One decoder layer. `q_norm` / `k_norm` `[head_dim]`: an RMSNorm over each head of q / k before rotary, one
    weight shared by every head (Qwen3); `rope` False: the layer attends without rotary (SmolLM3's NoPE layers);
    `rope_table` 1: it rotates with the second table (Gemma's local layers); `window`: its sliding window (None: full
    attention), as `PagedAttention` takes it; `kv_group`: which group's slots and tables (`run`'s `[G, T]` /
    `[G, B, max_blocks]`) address its cache in a grouped KV layout. Gemma (StackShape.gemma): `post_norm` is the
    pre-feedforward norm and `post_attn_norm` / `post_ffn_norm` the norms of each sublayer's output."""
    input_norm: torch.Tensor
    qkv: StackLinear
    o: StackLinear
    post_norm: torch.Tensor
    gate_up: StackLinear
    down: StackLinear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    rope: bool = True
    window: int | None = None
    rope_table: int = 0
    kv_group: int = 0
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class StackShape:
    """`rotary_dim`: the features of each head that rotate, the cos/sin table's width (None: the whole head).
    `gemma`: Gemma 3's layer: every norm scales by `1 + w` in float32 before its one rounding (the layers'
    `post_attn_norm` / `post_ffn_norm` wrap each sublayer's output), and the MLP is GeGLU with the tanh GELU."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    rotary_dim: int | None = None
    gemma: bool = False


_compiled = DECODE_STACK.build  # the extension (decode_stack.cpp) per ISA level, built once per process


def decode_stack_available() -> bool:
    return kernel_backend().mode != "torch" and DECODE_STACK() is not None


def _gguf_segments(lin: StackLinear) -> tuple[list[torch.Tensor], list[int]]:
    """A GGUF-kind linear's segments and their ggml type ids (none for the other kinds)."""
    if lin.kind not in GGUF_KINDS:
        return [], []
    return [raw for raw, _ in lin.weight.segments], [ggml_type_id(qtype) for _, qtype in lin.weight.segments]


def _norm_weight(w: torch.Tensor, dtype: torch.dtype, gemma: bool) -> torch.Tensor:
    """A norm's weight as the stack multiplies by it: Gemma's `1 + w` in float32 (as its RMSNorm computes it)."""
    return (1.0 + w.float() if gemma else w.to(dtype)).contiguous()


def _layer_extras(layer: StackLayer, dtype: torch.dtype, gemma: bool) -> tuple[list[torch.Tensor], list[int]]:
    """The layer's (q, k) head-norm weights (empty for none) and its (rotary table or -1, window, KV group) ints
    (window 0: full)."""
    norms = [torch.empty(0) if w is None else _norm_weight(w, dtype, gemma) for w in (layer.q_norm, layer.k_norm)]
    return norms, [layer.rope_table if layer.rope else -1, layer.window or 0, layer.kv_group]


def _layer_norms(layer: StackLayer, dtype: torch.dtype, gemma: bool) -> list[torch.Tensor]:
    """(input, post-attention) norms; Gemma's (input, post-attention, pre-feedforward, post-feedforward)."""
    if not gemma:
        return [_norm_weight(layer.input_norm, dtype, False), _norm_weight(layer.post_norm, dtype, False)]
    if layer.post_attn_norm is None or layer.post_ffn_norm is None:
        raise ValueError("a Gemma layer needs its post_attn_norm and post_ffn_norm")
    return [_norm_weight(w, dtype, True) for w in (layer.input_norm, layer.post_attn_norm, layer.post_norm,
                                                   layer.post_ffn_norm)]


def _linear_args(lin: StackLinear) -> tuple[list[torch.Tensor], list[int]]:
    """The linear's 4 tensors and 4 ints (kind, N, K, group; a GGUF linear's group: its segment count)."""
    bias, none = (torch.empty(0) if lin.bias is None else lin.bias), torch.empty(0)
    w = lin.weight
    if lin.kind in GGUF_KINDS:
        return [none, none, none, bias], [KINDS[lin.kind], w.n, w.k, len(w.segments)]
    if lin.kind == "q4":
        return [w.packed, w.scales_zeros, none, bias], [KINDS["q4"], w.n, w.k, w.group]
    if lin.kind == "q8":
        return [w.codes, w.scale, none, bias], [KINDS["q8"], w.codes.shape[0], w.k, 0]
    if lin.kind == "q4_blocks":
        return [w.codes, w.d, w.m, bias], [KINDS["q4_blocks"], w.codes.shape[0], w.k, 32]
    if lin.kind == "q8_blocks":
        return [w.codes, w.d, none, bias], [KINDS["q8_blocks"], w.codes.shape[0], w.k, 32]
    if lin.kind == "mkldnn":
        return [w, none, none, bias], [KINDS["mkldnn"], lin.out_features, 0, 0]
    return [w, none, none, bias], [KINDS["dense"], w.shape[0], w.shape[1], 0]


class DecodeStack:
    """The compiled step over fixed weights and caches: `run(x, positions, slot_mapping, block_tables, seq_lens,
    lora_slots)` maps the embedded tokens `[B, hidden]` to the final-normed hidden states `[B, hidden]`;
    `lora_slots` `[B]` (the adapter slot of each row, -1 for the base model) adds the LoRA deltas after each base
    product of a linear that carries LoRA stacks."""

    def __init__(self, layers: list[StackLayer], final_norm: torch.Tensor, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], cos_sin: torch.Tensor, shape: StackShape,
                 cos_sin_local: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        dtype = k_caches[0].dtype if dtype is None else dtype  # the activations' (caches may be float16 under float32)
        tables = [cos_sin] + ([] if cos_sin_local is None else [cos_sin_local])
        for table in tables:
            if table.shape[1] != (shape.rotary_dim or shape.head_dim):
                raise ValueError(f"cos/sin table of width {table.shape[1]} for rotary_dim "
                                 f"{shape.rotary_dim or shape.head_dim}")
        if any(layer.rope_table >= len(tables) for layer in layers):
            raise ValueError(f"a layer rotates with table {max(la.rope_table for la in layers)}; "
                             f"{len(tables)} given")
        gemma = shape.gemma
        norms, tensors, meta, segments, types, lora, qk_norms, layer_meta = [], [], [], [], [], [], [], []
        for layer in layers:
            norms += _layer_norms(layer, dtype, gemma)
            t, m = _layer_extras(layer, dtype, gemma)
            qk_norms += t
            layer_meta += m
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                t, m = _linear_args(lin)
                tensors += t
                meta += m
                segs, ids = _gguf_segments(lin)
                segments += segs
                types += ids
                lora += [torch.empty(0)] * 3 if lin.lora_a is None else [lin.lora_a, lin.lora_b, lin.lora_meta]
        norms.append(_norm_weight(final_norm, dtype, gemma))
        s = shape
        self._impl = DECODE_STACK().DecodeStack(norms, tensors, meta, segments, types, lora, qk_norms, layer_meta,
                                             k_caches, v_caches, [t.float().contiguous() for t in tables],
                                             s.num_heads, s.num_kv_heads, s.head_dim, s.eps, s.scale, gemma, dtype)

    def run(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        none = torch.empty(0, dtype=torch.long)
        return self._impl.run(x, positions, slot_mapping, block_tables, seq_lens,
                              none if lora_slots is None else lora_slots)


def _linear_ref(lin: StackLinear, x: torch.Tensor, lora: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """The base product and, for the rows of `lora` (rows, seg_starts, seg_slots), the adapters' deltas."""
    out = lin(x)
    if lora is not None and lin.lora_a is not None:
        lora_add_ref(out, x, lin.lora_a, lin.lora_b, *lora)
    return out


def _gemma_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm, as server/model/gemma3.py's module computes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).to(x.dtype)


def _attention_ref(layer: StackLayer, h: torch.Tensor, i: int, k_caches: list[torch.Tensor],
                   v_caches: list[torch.Tensor], tables: list[torch.Tensor], s: StackShape, positions: torch.Tensor,
                   slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   lora: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """The attention sublayer on its normed input: q/k/v, head norms, rotary, K/V written, attention, o."""
    from loom_kernels import paged_attention_decode, rms_norm, rotary, write_kv
    q, k, v = _linear_ref(layer.qkv, h, lora).split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                                      s.num_kv_heads * s.head_dim], dim=-1)
    q, k = q.reshape(-1, s.num_heads, s.head_dim), k.reshape(-1, s.num_kv_heads, s.head_dim)
    v = v.reshape(-1, s.num_kv_heads, s.head_dim)
    norm = (lambda t, w: _gemma_norm(t, w, s.eps)) if s.gemma else (lambda t, w: rms_norm(t, w, s.eps))
    if layer.q_norm is not None:
        q = norm(q, layer.q_norm)
    if layer.k_norm is not None:
        k = norm(k, layer.k_norm)
    if layer.rope:
        rotary(q, k, positions, tables[layer.rope_table])
    if slot_mapping.dim() == 2:  # per KV group
        slot_mapping, block_tables = slot_mapping[layer.kv_group], block_tables[layer.kv_group]
    write_kv(k, v, k_caches[i], v_caches[i], slot_mapping)
    attn = paged_attention_decode(q, k_caches[i], v_caches[i], block_tables, seq_lens, s.scale, layer.window or None)
    return _linear_ref(layer.o, attn.flatten(1), lora)


def decode_stack_ref(x: torch.Tensor, layers: list[StackLayer], final_norm: torch.Tensor,
                     k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], cos_sin: torch.Tensor,
                     shape: StackShape, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     lora_slots: torch.Tensor | None = None, cos_sin_local: torch.Tensor | None = None) -> torch.Tensor:
    """The same step through the public ops, as the Python layer loop of server/model/llama.py runs it (LoRA
    through `lora_add_ref`, as LoraLinear adds it; q/k norms as qwen3.py's RMSNorm modules, over `[T, heads, D]`),
    or for `shape.gemma` as server/model/gemma3.py's."""
    from loom_kernels import gelu_tanh_and_mul, rms_norm, silu_and_mul
    s = shape
    lora = None if lora_slots is None else lora_segments(lora_slots)
    tables = [cos_sin] + ([] if cos_sin_local is None else [cos_sin_local])
    args = (k_caches, v_caches, tables, s, positions, slot_mapping, block_tables, seq_lens, lora)
    if s.gemma:
        for i, layer in enumerate(layers):
            x = x + _gemma_norm(_attention_ref(layer, _gemma_norm(x, layer.input_norm, s.eps), i, *args),
                                layer.post_attn_norm, s.eps)
            h = _gemma_norm(x, layer.post_norm, s.eps)
            mlp = _linear_ref(layer.down, gelu_tanh_and_mul(_linear_ref(layer.gate_up, h, lora)), lora)
            x = x + _gemma_norm(mlp, layer.post_ffn_norm, s.eps)
        return _gemma_norm(x, final_norm, s.eps)
    residual = None
    for i, layer in enumerate(layers):
        if residual is None:
            residual, h = x, rms_norm(x, layer.input_norm, s.eps)
        else:
            h, residual = rms_norm(x, layer.input_norm, s.eps, residual)
        h, residual = rms_norm(_attention_ref(layer, h, i, *args), layer.post_norm, s.eps, residual)
        x = _linear_ref(layer.down, silu_and_mul(_linear_ref(layer.gate_up, h, lora)), lora)
    out, _ = rms_norm(x, final_norm, s.eps, residual)
    return out
