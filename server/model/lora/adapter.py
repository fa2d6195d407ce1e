"""PEFT LoRA directories (`adapter_config.json` + `adapter_model.safetensors`) read into Loom's module layout.

Loom fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. An adapter's pairs for the parts of a fused module
are stacked into one pair: A rows one part after the other, B block-diagonal (each part's B in its own output rows
and rank columns, zeros elsewhere), so a fused module takes one shrink and one expand and each part's delta lands in
its own slice of the output. The scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA) is folded into B."""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SHARDS_PER_MODULE = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
# PEFT's module name -> (Loom module, part index); a fused name stands for the whole module (None)
PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "o_proj": ("o_proj", 0),
         "down_proj": ("down_proj", 0), "qkv_proj": ("qkv_proj", None), "gate_up_proj": ("gate_up_proj", None)}
TENSOR = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                    r"(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served beside this model; the message says why."""


@dataclass
class LoraAdapter:
    name: str
    path: str
    id: int  # unique per load: a reloaded name is a new adapter (its own prefix-cache blocks, its own slot)
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # Loom module name -> (A [R, in], scaled B [out, R])
    created: int = field(default_factory=lambda: int(time.time()))


def read_config(directory: Path, max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from `adapter_config.json`, refusing what Loom does not run."""
    try:
        cfg = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {directory / 'adapter_config.json'}: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory} is not a LoRA adapter (peft_type {cfg.get('peft_type')!r})"
                           if isinstance(cfg, dict) else f"{directory}/adapter_config.json is not an object")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter_config.json needs a positive integer `r` and a numeric `lora_alpha`, "
                           f"got r={r!r}, lora_alpha={alpha!r}")
    if r > max_rank:
        raise AdapterError(f"the adapter's rank {r} is over this server's --max-lora-rank {max_rank}")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
                               "layer_replication", "trainable_token_indices") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"adapter_config.json uses {', '.join(unsupported)}, which Loom does not serve")
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def read_tensors(directory: Path, rank: int) -> dict[tuple[str, int | None], dict[str, torch.Tensor]]:
    """(Loom module name, part) -> {"A": ..., "B": ...} from `adapter_model.safetensors`."""
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{directory} has no adapter_model.safetensors")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the client's to fix
        raise AdapterError(f"cannot read {path}: {exc}") from None
    pairs: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = TENSOR.match(key)
        if m is None or m.group(3) not in PARTS:
            raise AdapterError(f"tensor {key!r} is not a LoRA weight of q/k/v/o or gate/up/down projections")
        module, part = PARTS[m.group(3)]
        pairs.setdefault((f"model.layers.{m.group(1)}.{m.group(2)}.{module}", part), {})[m.group(4)] = tensor
    for (name, part), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{name}: lora_A and lora_B must both be given")
        if pair["A"].dim() != 2 or pair["A"].shape[0] != rank or pair["B"].dim() != 2 or pair["B"].shape[1] != rank:
            raise AdapterError(f"{name}: lora_A {tuple(pair['A'].shape)} and lora_B {tuple(pair['B'].shape)} "
                               f"do not have rank {rank}")
    if not pairs:
        raise AdapterError(f"{path} holds no LoRA weights")
    return pairs


def fuse(name: str, parts: dict[int | None, dict[str, torch.Tensor]], in_features: int, sizes: list[int],
         scaling: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (A, B): the parts stacked, B block-diagonal over the parts' output slices."""
    if None in parts and len(parts) > 1:
        raise AdapterError(f"{name}: the fused projection and its parts are both given")
    bounds = [(0, sum(sizes))] if None in parts else [(sum(sizes[:i]), sizes[i]) for i in range(len(sizes))]
    order = sorted(parts, key=lambda p: -1 if p is None else p)
    rank = parts[order[0]]["A"].shape[0]
    a = torch.cat([parts[p]["A"].float() for p in order])
    b = torch.zeros(sum(sizes), rank * len(order))
    for j, p in enumerate(order):
        start, size = bounds[0] if p is None else bounds[p]
        pa, pb = parts[p]["A"], parts[p]["B"]
        if pa.shape[1] != in_features or pb.shape[0] != size:
            raise AdapterError(f"{name}: lora_A {tuple(pa.shape)} / lora_B {tuple(pb.shape)} do not fit the "
                               f"model's projection ({in_features} in, {size} out)")
        b[start:start + size, j * rank:(j + 1) * rank] = pb.float() * scaling
    a, b = a.to(dtype), b.to(dtype)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # NaN/inf would poison every answer it touches
        raise AdapterError(f"{name}: the weights (B scaled by {scaling:g}) hold values that are not finite in {dtype}")
    return a, b


def adapter_directory(path: str) -> Path:
    """The directory `path` names; AdapterError for anything else, paths the OS will not look up included (names
    too long, NUL bytes, `~user` of no user): a client's path is never the server's fault."""
    try:
        directory = Path(path).expanduser()
        if directory.is_dir():
            return directory
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path[:300]!r} is not a usable path: {exc}") from None
    raise AdapterError(f"{path} is not a directory (expected a PEFT adapter directory)")


def read_adapter(name: str, path: str, adapter_id: int, modules: dict[str, nn.Module],
                 shard_sizes: Callable[[str], list[int]], max_rank: int, dtype: torch.dtype) -> LoraAdapter:
    """Read and check a PEFT adapter against the model's wrapped projections (`modules`, by Loom name); raises
    AdapterError with the reason when it does not fit. Nothing served is touched."""
    directory = adapter_directory(path)
    rank, scaling = read_config(directory, max_rank)
    grouped: dict[str, dict[int | None, dict[str, torch.Tensor]]] = {}
    for (module, part), pair in read_tensors(directory, rank).items():
        grouped.setdefault(module, {})[part] = pair
    weights = {}
    for module, parts in grouped.items():
        target = modules.get(module)
        if target is None:
            raise AdapterError(f"{module}: the model has no such projection")
        kind = module.rsplit(".", 1)[1]
        sizes = shard_sizes(kind) if SHARDS_PER_MODULE[kind] > 1 else [target.out_features]
        weights[module] = fuse(module, parts, target.in_features, sizes, scaling, dtype)
    return LoraAdapter(name, str(directory), adapter_id, rank, weights)
