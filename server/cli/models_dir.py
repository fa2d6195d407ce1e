"""`--models-dir`: how a directory model is opened, and how the KV cache budget is split among the models.

Every engine sizes its own KV cache. With `--max-loaded-models N`, the default model and the N directory models may
be loaded together, so on CPU each gets 1/(N+1) of the budget: of `--kv-cache-memory` GiB when given, else of
`--kv-cache-memory-fraction` of the memory the process may use. An exact `--num-kv-blocks` applies to each model as
it is, and is the way to size them on GPU: there an engine takes what `--gpu-memory-utilization` leaves after
everything already on the device, so without it the first model loaded would leave the next ones one block."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `loom --help` imports no torch
    from server.engine import AsyncEngine, EngineSettings
    from server.model import ModelSettings, Tokenizer


def add_models_dir_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("models directory")
    m.add_argument("--models-dir", default=None, metavar="DIR",
                   help="also serve every .gguf file and Hugging Face directory in DIR by its name (file stem, "
                        "directory name), loaded on first use; --model stays the default (LOOM_MODELS_DIR)")
    m.add_argument("--max-loaded-models", type=int, default=None, metavar="N",
                   help="directory models loaded at once, least recently used unloaded first once its requests "
                        "finish (LOOM_MAX_LOADED_MODELS, default 1); the KV budget is split among them and the default")
    m.add_argument("--model-idle-unload", type=float, default=None, metavar="SECONDS",
                   help="seconds unused after which a directory model is unloaded (LOOM_MODEL_IDLE_UNLOAD, 0: never)")
    m.add_argument("--model-memory-headroom", type=float, default=None, metavar="GIB",
                   help="memory kept free when loading a directory model: least recently used models are unloaded "
                        "to make room, and a model that cannot fit even alone answers 503 "
                        "(LOOM_MODEL_MEMORY_HEADROOM, default 1.0)")


def kv_share(settings: EngineSettings, models: int) -> EngineSettings:
    """`settings` with the KV budget of one of `models` models loaded together."""
    update = {"kv_cache_memory_fraction": settings.kv_cache_memory_fraction / models}
    if settings.kv_cache_memory is not None:
        update["kv_cache_memory"] = settings.kv_cache_memory / models
    return settings.model_copy(update=update)


@dataclass
class DirectoryModels:
    """Opens directory models with the server's model settings and each model's share of the engine settings."""
    model_settings: ModelSettings
    engine_settings: EngineSettings

    def check(self, path: str) -> None:
        from server.model.loader import check_supported

        check_supported(path)

    def resident_bytes(self, path: str) -> int:
        from server.cli.model_memory import resident_bytes

        return resident_bytes(path, self.model_settings, self.engine_settings)

    def available_bytes(self) -> int | None:
        """Free memory for one more model; None on GPU, where the weights and KV cache fill the device's memory
        (bounded by --gpu-memory-utilization and --num-kv-blocks), not this machine's."""
        from server.cli.model_memory import available_memory
        from server.model.loader import pick_device

        return None if pick_device(self.model_settings.device).type == "cuda" else available_memory()

    def open(self, name: str, path: str) -> tuple[AsyncEngine, str, Tokenizer]:
        """`path` loaded in an engine on its own thread (the default model's engine keeps the main thread)."""
        from server.engine import AsyncEngine, EngineCore
        from server.model import load_model

        ms = self.model_settings.model_copy(update={"model": path, "served_model_name": name})
        lm = load_model(ms, progress=False)
        return AsyncEngine(EngineCore(lm, self.engine_settings)), name, lm.tokenizer
