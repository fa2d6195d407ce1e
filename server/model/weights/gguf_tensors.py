"""A GGUF's tensors as they are stored, under Hugging Face names.

Each tensor's bytes are read straight from the file into memory Loom owns (no mapping, so the page cache never
counts in the resident set, and no float32 copy): block types with a Loom kernel stay as their raw blocks
(`QTensor.kind == "gguf"`, loom_kernels/quant/kquants.py), float tensors become dense tensors, and the few block
types without a kernel (IQ*, Q2_K, Q3_K, TQ*) are de-quantized for the loader to re-quantize, with a log line naming
them. llama.cpp's changes to some tensors are undone: its rotary row order of q/k in Llama-converted files, and the
`+1` it stores in Gemma's norms."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loom_kernels.quant import (
    GGUF_KERNEL_TYPES,
    BlockQ4,
    BlockQ8,
    GGUFBlocks,
    concat_gguf_blocks,
    dequantize_gguf,
    gguf_blocks,
    gguf_kernels_available,
)
from server.model.weights.gguf_file import GGUFHeader, TensorInfo

log = logging.getLogger("loom.model")

BLOCK = 32
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Gemma 3 has four norms per layer; Phi-3 stores gate and up as one `ffn_up`
ARCH_LAYER_NAMES = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm":
                               "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
                    "phi3": {"ffn_up": "mlp.gate_up_proj"}}
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
PERMUTED_ARCHS = ("llama", "smollm3")  # converted through llama.cpp's LlamaModel, which reorders q/k rows
NORM_PLUS_ONE_ARCHS = ("gemma3",)


@dataclass
class QTensor:
    """One weight `[N, K]`: kind "gguf" (a GGUF's own blocks, `blocks`), "q4" (codes 0..15, scale/zero
    `[N, K/32]`), "q8" (int8 codes, scale `[N, K/32]`) or "dense" (float `dense`). `source` names the stored type,
    for logs."""
    kind: str
    source: str
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    blocks: GGUFBlocks | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "gguf":
            return (self.blocks.n, self.blocks.k)
        return tuple((self.dense if self.kind == "dense" else self.codes).shape)

    def nbytes(self) -> int:
        if self.kind == "gguf":
            return self.blocks.nbytes
        ts = (self.codes, self.scale, self.zero, self.dense)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def dequantize(self) -> torch.Tensor:
        if self.kind == "dense":
            return self.dense.float()
        if self.kind == "gguf":
            return dequantize_blocks(self.blocks)
        s = self.scale.repeat_interleave(BLOCK, dim=1)
        if self.kind == "q8":
            return self.codes.float() * s
        return (self.codes.float() - 8) * s + self.zero.repeat_interleave(BLOCK, dim=1)

    def as_codes(self) -> QTensor:
        """A single Q4_0 / Q4_1 / Q8_0 GGUF weight as codes with scales (the int4pack / block-kernel forms)."""
        (raw, qtype), = self.blocks.segments
        return decode(qtype, raw.numpy(), self.blocks.n, self.blocks.k)


def code_block_form(blocks: GGUFBlocks) -> BlockQ4 | BlockQ8:
    """A single Q4_0 / Q4_1 / Q8_0 weight in the older block kernel's layout, sliced from the file's bytes: a block's
    nibbles are already that kernel's (code j low, code j + 16 high), its d and m the same float16 (Q4_0's m = -8 d,
    exact), Q8_0's codes the same int8. Milliseconds, where going through codes took seconds per model."""
    (raw, qtype), = blocks.segments
    n, g = raw.shape[0], blocks.k // 32
    b = raw.reshape(n, g, -1)

    def half(at: int) -> torch.Tensor:
        return b[:, :, at:at + 2].contiguous().view(torch.float16).reshape(n, g)

    if qtype == "Q8_0":
        return BlockQ8(b[:, :, 2:34].contiguous().view(torch.int8).reshape(n, g * 32), half(0), blocks.k)
    if qtype == "Q4_1":
        return BlockQ4(b[:, :, 4:20].reshape(n, g * 16).contiguous(), half(0), half(2), blocks.k)
    if qtype == "Q4_0":
        return BlockQ4(b[:, :, 2:18].reshape(n, g * 16).contiguous(), half(0), half(0) * -8, blocks.k)
    raise ValueError(f"{qtype} blocks have no code-block form")


def dequantize_blocks(blocks: GGUFBlocks) -> torch.Tensor:
    """float32 `[N, K]`: Loom's kernel, or gguf-py's numpy de-quantizer (same bits) where no compiler built it."""
    if gguf_kernels_available():
        return dequantize_gguf(blocks)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.cat([torch.from_numpy(dequantize(raw.numpy(), GGMLQuantizationType[qtype]).astype(np.float32))
                      for raw, qtype in blocks.segments])


def merge_same_types(blocks: GGUFBlocks) -> GGUFBlocks:
    """Neighbouring Q4_0 / Q4_1 / Q8_0 segments of one type as one (a copy of those rows): such a weight can also
    run under the int4pack and code-block kernels, which take one type. Other types stay separate segments (the
    GGUF kernel walks them without a copy)."""
    merged: list[tuple[torch.Tensor, str]] = []
    for raw, qtype in blocks.segments:
        if merged and merged[-1][1] == qtype and qtype in ("Q4_0", "Q4_1", "Q8_0"):
            merged[-1] = (torch.cat([merged[-1][0], raw]), qtype)
        else:
            merged.append((raw, qtype))
    return GGUFBlocks(merged, blocks.k)


def cat_rows(parts: list[QTensor]) -> QTensor:
    """Fuse projections (q/k/v, gate/up) into one weight. GGUF blocks of any mix of types fuse without a copy;
    other mixed kinds fall back to dense float32."""
    kinds = {p.kind for p in parts}
    source = "+".join(sorted({p.source for p in parts}))
    if kinds == {"gguf"}:
        return QTensor("gguf", source, blocks=merge_same_types(concat_gguf_blocks([p.blocks for p in parts])))
    if len(kinds) > 1:
        parts = [QTensor("dense", p.source, dense=p.dequantize()) for p in parts]
    cat = (lambda f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts]))
    return QTensor(parts[0].kind, source, cat("codes"), cat("scale"), cat("zero"), cat("dense"))


def decode(kind: str, raw: np.ndarray, n: int, k: int) -> QTensor:
    """Raw Q4_0 / Q4_1 / Q8_0 blocks `[N, bytes per row]` -> codes and scales. Q4 blocks: f16 d (and f16 m for
    Q4_1), then 16 bytes whose low nibbles are weights 0..15 and high nibbles weights 16..31. Q8_0: f16 d, 32 int8."""
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


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors the config already carries (rope factors)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    if gguf_name in CONFIG_TENSORS:
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    names = {**LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {})}
    if not m or m.group(2) not in names:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no place in a {arch} model")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def read_bytes(path: Path, info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes, read (not mapped) into a new uint8 tensor."""
    out = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(info.offset)
        view, done = memoryview(out.numpy()), 0
        while done < info.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{path} ends inside tensor {info.name!r}")
            done += got
    return out


def read_float(path: Path, info: TensorInfo) -> torch.Tensor:
    """A float tensor (F32/F16/BF16, as stored) or one of a type without a kernel, de-quantized to float32."""
    raw = read_bytes(path, info)
    if info.qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[info.qtype]).reshape(info.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(raw.numpy().reshape(info.shape[0], -1), GGMLQuantizationType[info.qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def read_tensor(header: GGUFHeader, info: TensorInfo, name: str, heads: tuple[int, int]) -> QTensor:
    arch = header.architecture
    if info.qtype in GGUF_KERNEL_TYPES and len(info.shape) == 2:
        raw = read_bytes(header.path, info).reshape(info.shape[0], -1)
        if arch in PERMUTED_ARCHS and name.endswith(("q_proj.weight", "k_proj.weight")):
            raw = raw[unpermute_index(info.shape[0], heads[0] if ".q_proj." in name else heads[1])].contiguous()
        return QTensor("gguf", info.qtype, blocks=gguf_blocks(raw, info.qtype, info.shape[1]))
    dense = read_float(header.path, info)
    if arch in PERMUTED_ARCHS and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        dense = dense[unpermute_index(info.shape[0], heads[0] if ".q_proj." in name else heads[1])]
    if arch in NORM_PLUS_ONE_ARCHS and name.endswith("norm.weight"):
        dense = dense.float() - 1
    return QTensor("dense", info.qtype, dense=dense.contiguous())


def read_gguf(header: GGUFHeader, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, QTensor]]:
    """(Hugging Face name, tensor) for every weight of the GGUF, in file order."""
    fallback: dict[str, list[str]] = {}
    for info in header.tensors.values():
        name = hf_name(info.name, header.architecture)
        if name is None:
            continue
        if info.qtype not in GGUF_KERNEL_TYPES and info.qtype not in FLOAT_TYPES:
            fallback.setdefault(info.qtype, []).append(info.name)
        yield name, read_tensor(header, info, name, (num_heads, num_kv_heads))
    if fallback:
        log.warning("GGUF types without a Loom kernel, de-quantized and re-quantized to 4-bit at load",
                    extra={"types": {t: names[:4] + (["..."] if len(names) > 4 else []) for t, names in
                                     fallback.items()}, "tensors": sum(map(len, fallback.values()))})
