"""`--models-dir` memory: about how much a model will hold once loaded, and how much the machine has free for it.

A model's estimate is its stored weights (a GGUF's tensor bytes, a Hugging Face directory's safetensors) times
`--weight-memory` (the most the quantized linears may grow to with dense copies), plus the KV cache its own engine
allocates, sized by the same rule the engine applies (server/engine/model_runner.py's `size_kv_cache`)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `loom --help` imports no torch
    from server.engine import EngineSettings
    from server.model import ModelSettings
    from server.model.config import ModelConfig


def stored_weights(path: Path) -> tuple[int, ModelConfig]:
    """The bytes of the weights at `path` as stored, and the model's config (from metadata only)."""
    from server.model.config import ModelConfig
    from server.model.weights.gguf import hf_config
    from server.model.weights.gguf_file import read_header

    if path.is_file():
        header = read_header(path)
        return header.tensor_bytes(), ModelConfig.from_dict(hf_config(header))
    return sum(f.stat().st_size for f in path.glob("*.safetensors")), ModelConfig.from_path(path / "config.json")


def kv_cache_bytes(cfg: ModelConfig, model_settings: ModelSettings, engine_settings: EngineSettings,
                   is_gguf: bool) -> int:
    """The bytes of the KV cache an engine with `engine_settings` allocates on CPU for a model of `cfg` (a GGUF file
    or a Hugging Face directory: the quantization, and with it the KV cache's dtype, follow)."""
    import torch

    from server.engine.limits import context_window
    from server.engine.model_runner import size_kv_cache
    from server.model.loader import pick_dtype
    from server.model.weights.quant_load import resolve_mode

    cpu = torch.device("cpu")
    quantization = resolve_mode(model_settings.quantization, model_settings.dtype, is_gguf, cpu, cfg.family)
    shape = SimpleNamespace(config=cfg, dtype=pick_dtype(model_settings.dtype, cpu, model_settings.cpu_isa),
                            device=cpu, quantization=quantization)  # all that size_kv_cache reads of a loaded model
    sizing = size_kv_cache(shape, engine_settings, context_window(engine_settings.max_model_len, cfg.max_model_len))
    return sizing.blocks * sizing.bytes_per_block


def resident_bytes(spec: str, model_settings: ModelSettings, engine_settings: EngineSettings) -> int:
    """About what the model `spec` names holds in memory once loaded in its own engine: weights and KV cache."""
    from server.model.loader import resolve_source

    path = resolve_source(spec)
    weights, cfg = stored_weights(path)
    return int(weights * model_settings.weight_memory) + kv_cache_bytes(cfg, model_settings, engine_settings,
                                                                       path.is_file())


def available_memory() -> int:
    """Bytes this process could still take: the machine's available memory (page cache it may reclaim included),
    or less when a cgroup limit is nearer."""
    import psutil

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return available
    return min(available, int(limit) - used) if limit.isdigit() else available
