"""A GGUF's tensors as they are stored: Q4_0 / Q4_1 blocks as 4-bit codes with per-32 scale and zero (int4pack's
convention, see loom_kernels/quant/reference.py), Q8_0 as int8 codes with per-32 scales, anything else de-quantized to
float32 by the `gguf` package. Names are mapped to Hugging Face's and llama.cpp's q/k row permutation is undone, so
`QTensor.dequantize()` equals what transformers' GGUF loader produces."""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK = 32
LLAMA_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
LLAMA_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@dataclass
class QTensor:
    """One weight `[N, K]`: kind "q4" (codes 0..15, scale/zero `[N, K/32]`), "q8" (int8 codes, scale `[N, K/32]`,
    zero None) or "dense" (float32 `dense`). `source` is the GGUF type name, for logs."""
    kind: str
    source: str
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        t = self.dense if self.kind == "dense" else self.codes
        return tuple(t.shape)

    def dequantize(self) -> torch.Tensor:
        if self.kind == "dense":
            return self.dense
        s = self.scale.repeat_interleave(BLOCK, dim=1)
        if self.kind == "q8":
            return self.codes.float() * s
        return (self.codes.float() - 8) * s + self.zero.repeat_interleave(BLOCK, dim=1)

    def rows(self, index: torch.Tensor) -> QTensor:
        pick = (lambda t: None if t is None else t[index])
        return QTensor(self.kind, self.source, pick(self.codes), pick(self.scale), pick(self.zero), pick(self.dense))


def cat_rows(parts: list[QTensor]) -> QTensor:
    """Fuse projections (q/k/v, gate/up) into one weight; mixed kinds fall back to dense float32."""
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        parts = [QTensor("dense", p.source, dense=p.dequantize()) for p in parts]
    cat = (lambda f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts]))
    return QTensor(parts[0].kind, "+".join(sorted({p.source for p in parts})), cat("codes"), cat("scale"),
                   cat("zero"), cat("dense"))


def decode(kind: str, raw: np.ndarray, n: int, k: int) -> QTensor:
    """Raw GGUF blocks `[N, bytes per row]` -> QTensor. Q4 blocks: f16 d (and f16 m for Q4_1), then 16 bytes whose
    low nibbles are weights 0..15 and high nibbles weights 16..31. Q8_0: f16 d, 32 int8."""
    head = 4 if kind == "Q4_1" else 2
    blocks = raw.reshape(n, k // BLOCK, -1)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return QTensor("q8", kind, codes=codes, scale=d)
    qs = torch.from_numpy(blocks[..., head:].copy())
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
    if kind == "Q4_0":  # d * (q - 8): zero 0
        return QTensor("q4", kind, codes=codes, scale=d, zero=torch.zeros_like(d))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return QTensor("q4", kind, codes=codes, scale=d, zero=m + 8 * d)


def unpermute_index(n_rows: int, n_head: int) -> torch.Tensor:
    """Rows of llama.cpp's rotary permutation, undone (transformers' `_reverse_permute_weights`)."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(n_rows)


def read_gguf(path: Path, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, QTensor]]:
    """(Hugging Face name, tensor) for every tensor of a Llama-family GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for t in GGUFReader(str(path)).tensors:
        name = LLAMA_NAMES.get(t.name)
        if name is None:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if not m or m.group(2) not in LLAMA_LAYER:
                raise KeyError(f"GGUF tensor {t.name!r} has no place in a Llama model")
            name = f"model.layers.{m.group(1)}.{LLAMA_LAYER[m.group(2)]}.{m.group(3)}"
        kind = t.tensor_type.name
        shape = [int(s) for s in reversed(t.shape)]  # GGUF lists dims innermost first
        if kind in ("Q4_0", "Q4_1", "Q8_0") and len(shape) == 2:
            q = decode(kind, np.asarray(t.data), *shape)
        else:
            q = QTensor("dense", kind, dense=torch.from_numpy(
                np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape).copy()))
        if name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = num_heads if ".q_proj." in name else num_kv_heads
            q = q.rows(unpermute_index(shape[0], heads))
        yield name, q
