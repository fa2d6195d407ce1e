"""Build a decoder whose linears and embedding are quantized (server/model/weights/quant.py): from a GGUF's own
blocks as read from the file, or from float safetensors quantized at load to 'q4'/'q8' (cached in the cache dir:
quantizing takes a while)."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from loom_kernels.quant import quantize_q4, quantize_q8
from server.model.cache_files import write_file_atomically
from server.model.config import ModelConfig
from server.model.empty import empty_modules
from server.model.weights.gguf_file import GGUFHeader
from server.model.weights.gguf_tensors import FLOAT_TYPES, QTensor, cat_rows, read_gguf
from server.model.weights.quant import QuantEmbedding, QuantLinear

log = logging.getLogger("loom.model")

FIELDS = ("codes", "scale", "zero", "dense")


def resolve_mode(setting: str, dtype_setting: str, is_gguf: bool, device: torch.device, family: str) -> str:
    """'gguf' (the file's own blocks), 'q4', 'q8' or 'none'. `auto` runs a GGUF's own blocks unless float32 was asked
    for explicitly: `--dtype float32` stays the de-quantized model, token-identical to Hugging Face."""
    if device.type != "cpu" or family == "gpt2" or setting == "none":
        return "none"
    if setting == "auto":
        return "gguf" if is_gguf and dtype_setting != "float32" else "none"
    if setting == "gguf" and not is_gguf:
        raise ValueError("--quantization gguf needs a .gguf model; use q4 or q8 to quantize safetensors")
    return setting


def to_q4(q: QTensor) -> QTensor:
    codes, scale, zero = quantize_q4(q.dequantize(), 32)
    return QTensor("q4", f"{q.source}->q4", codes=codes, scale=scale, zero=zero)


def to_q8(q: QTensor) -> QTensor:
    codes, scale = quantize_q8(q.dequantize())  # per-row scale, stored per 32-block like Q8_0
    return QTensor("q8", f"{q.source}->q8", codes=codes, scale=scale[:, None].expand(-1, codes.shape[1] // 32).clone())


def convert(tensors: Iterable[tuple[str, QTensor]], mode: str) -> dict[str, QTensor]:
    """Each matrix in its run form: mode 'q4'/'q8' quantizes every one; 'gguf' keeps the file's blocks and float
    matrices and re-quantizes to 4-bit only what no kernel runs (read_gguf de-quantized those)."""
    out, requantized = {}, {}
    for name, q in tensors:
        matrix = len(q.shape) == 2 and q.shape[1] % 32 == 0
        keep = mode == "gguf" and (q.kind == "gguf" or q.source in FLOAT_TYPES)
        target = {"q8": "q8"}.get(mode, "q4")
        if matrix and not keep and q.kind != target:
            q = to_q4(q) if target == "q4" else to_q8(q)
            requantized[q.source] = requantized.get(q.source, 0) + 1
        out[name] = q
    if requantized:
        log.info("re-quantized tensors", extra={"mode": mode, "tensors": requantized})
    return out


def gguf_tensors(header: GGUFHeader, mode: str, cfg: ModelConfig) -> dict[str, QTensor]:
    """Every tensor of a GGUF in its run form, read from the file (no cache: the blocks are the run form)."""
    return convert(read_gguf(header, cfg.num_heads, cfg.num_kv_heads), mode)


def cache_file(source: Path, mode: str, cache_dir: Path) -> Path:
    files = sorted(source.glob("*.safetensors"))
    ident = ";".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir / "quantized" / f"{source.name}-{mode}-{digest}.safetensors"


def save(path: Path, tensors: dict[str, QTensor]) -> None:
    from safetensors.torch import save_file
    flat, meta = {}, {}
    for name, q in tensors.items():
        meta[name] = f"{q.kind}|{q.source}"
        for f in FIELDS:
            if getattr(q, f) is not None:
                flat[f"{name}::{f}"] = getattr(q, f).contiguous()
    write_file_atomically(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def load(path: Path) -> dict[str, QTensor]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as h:
        meta, flat = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    return {name: QTensor(*spec.split("|", 1), **{f: flat.get(f"{name}::{f}") for f in FIELDS})
            for name, spec in meta.items()}


def safetensors_quantized(directory: Path, mode: str, cache_dir: Path,
                          dense_weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, QTensor]:
    """A safetensors checkpoint quantized at load to 'q4' or 'q8' (cached: quantizing takes a while)."""
    path = cache_file(directory, mode, cache_dir)
    if path.is_file():
        return load(path)
    raw = ((n, QTensor("dense", str(t.dtype).removeprefix("torch."), dense=t.float())) for n, t in dense_weights)
    tensors = convert(raw, mode)
    save(path, tensors)
    return tensors


def fused_parts(model: nn.Module) -> dict[str, list[str]]:
    """'qkv_proj' -> ['q_proj', 'k_proj', 'v_proj'] from the family's Hugging Face packing map."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for part, (fused, shard) in getattr(model, "packed", {}).items():
        parts.setdefault(fused, []).append((shard, part))
    return {fused: [p for _, p in sorted(v)] for fused, v in parts.items()}


def take(tensors: dict[str, QTensor], key: str) -> QTensor:
    """A linear's weight, out of `tensors` so a fused copy never lives beside its parts (a tied head shares the
    embedding, which stays)."""
    return tensors[key] if key.startswith("model.embed_tokens.") else tensors.pop(key)


def build_quantized(family: type[nn.Module], cfg: ModelConfig, dtype: torch.dtype,
                    tensors: dict[str, QTensor]) -> nn.Module:
    """The decoder with QuantLinear/QuantEmbedding in place of nn.Linear/nn.Embedding, norms in `dtype`."""
    with empty_modules():
        model = family(cfg)
    fused = fused_parts(model)
    for name, mod in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Embedding):
            setattr(parent, child, QuantEmbedding(tensors[f"{name}.weight"], dtype))
        elif isinstance(mod, nn.Linear):
            names = [f"{parent_name}.{p}" for p in fused.get(child, [child])] if parent_name else [name]
            if name == "lm_head" and "lm_head.weight" not in tensors:
                names = ["model.embed_tokens"]  # tied head
            weight = cat_rows([take(tensors, f"{n}.weight") for n in names])
            bias = (torch.cat([tensors[f"{n}.bias"].dequantize() for n in names]).to(dtype)
                    if mod.bias is not None else None)
            setattr(parent, child, QuantLinear(weight, bias, float_output=name == "lm_head"))
    for mod in model.modules():  # what is left on meta: norms (and biases of unquantized layers)
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype)
    model.post_init()
    quant_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
                    for p, _ in m.named_parameters()}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname in tensors:
                p.copy_(tensors[pname].dequantize())
            elif pname not in quant_params:
                raise KeyError(f"checkpoint lacks {pname!r}")
    return model.eval().requires_grad_(False)
