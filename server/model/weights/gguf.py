"""What a GGUF says besides its tensors: the model's configuration (as a Hugging Face `config.json` would say it) and
its tokenizer with the chat template, both from the header's metadata.

The tokenizer is built once by transformers' GGUF tokenizer converter and saved (a few MB) in the cache dir keyed by
the file's identity; later starts load it in a fraction of a second. The weights are never converted: the loader
reads them as stored (gguf_tensors.py). `export_hf_directory` writes a float32 Hugging Face copy for comparisons
with transformers and Hugging Face peers (tests, loadtests); the server never calls it."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from server.model.cache_files import publish_directory, temporary_for
from server.model.config import UnsupportedModelError
from server.model.weights.gguf_file import GGUFHeader, read_header, write_tokenizer_only
from server.model.weights.gguf_tensors import read_float

log = logging.getLogger("loom.model")

# GGUF `general.architecture` -> the Hugging Face model_type Loom runs it as (Mistral GGUFs say "llama")
GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3",
                    "smollm3": "smollm3"}
ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
# llama.cpp metadata key (after "<arch>.") -> Hugging Face config key
CONFIG_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
               "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.key_length": "head_dim",
               "rope.freq_base": "rope_theta", "attention.sliding_window": "sliding_window",
               "final_logit_softcapping": "final_logit_softcapping",
               "attn_logit_softcapping": "attn_logit_softcapping"}


def file_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def hf_config(header: GGUFHeader) -> dict[str, Any]:
    """The Hugging Face config of the model in `header` (raises UnsupportedModelError for other architectures)."""
    arch = header.architecture
    if arch not in GGUF_MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; Loom runs "
                                    f"{', '.join(sorted(GGUF_MODEL_TYPES))} GGUF files")
    meta, model_type = header.metadata, GGUF_MODEL_TYPES[arch]
    raw: dict[str, Any] = {"model_type": model_type, "architectures": [ARCHITECTURE_NAMES[model_type]]}
    for key, hf_key in CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            raw[hf_key] = meta[f"{arch}.{key}"]
    raw.setdefault("num_key_value_heads", raw["num_attention_heads"])
    head_dim = raw.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    rot = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raw["partial_rotary_factor"] = rot / head_dim
    tokens = meta.get("tokenizer.ggml.tokens")
    raw["vocab_size"] = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else int(tokens))
    raw["tie_word_embeddings"] = "output.weight" not in header.tensors
    raw["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
    raw["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    raw["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    raw.update(rope_scaling(header, arch))
    raw.update(ARCH_EXTRAS.get(model_type, lambda h, r: {})(header, raw))
    return raw


def rope_scaling(header: GGUFHeader, arch: str) -> dict[str, Any]:
    """llama.cpp keeps Llama 3's per-frequency divisors and Phi-3's LongRoPE factors as small tensors."""
    meta, tensors = header.metadata, header.tensors

    def factors(name: str) -> list[float]:
        return read_float(header.path, tensors[name]).float().tolist()

    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        return {"rope_scaling": {"rope_type": "factors", "factors": factors("rope_freqs.weight")}}
    if "rope_factors_long.weight" in tensors:
        original = meta.get(f"{arch}.rope.scaling.original_context_length", raw_context(header, arch))
        return {"rope_scaling": {"rope_type": "longrope", "short_factor": factors("rope_factors_short.weight"),
                                 "long_factor": factors("rope_factors_long.weight")},
                "original_max_position_embeddings": original}
    if kind in ("none", ""):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}}
    raise UnsupportedModelError(f"unsupported rope scaling {kind!r} in this GGUF (Loom has linear, longrope, "
                                f"and Llama 3's frequency factors)")


def raw_context(header: GGUFHeader, arch: str) -> int:
    return int(header.metadata.get(f"{arch}.context_length", 2048))


def _gemma3(header: GGUFHeader, raw: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's local/global layout: from the file where it says (newer converters), else Gemma 3's own values
    (every sixth layer global, local rope base 10000)."""
    meta = header.metadata
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    extra = {"query_pre_attn_scalar": raw["head_dim"], "hidden_activation": "gelu_pytorch_tanh",
             "rope_local_base_freq": float(meta.get("gemma3.rope.freq_base_swa", 10000.0))}
    if isinstance(pattern, list):  # per layer: true = sliding window
        extra["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        extra["sliding_window_pattern"] = int(pattern)
    return extra


def _smollm3(header: GGUFHeader, raw: dict[str, Any]) -> dict[str, Any]:
    layers = header.metadata.get("smollm3.no_rope_layers")
    return {"no_rope_layers": list(layers)} if isinstance(layers, list) else {"no_rope_layer_interval": 4}


ARCH_EXTRAS = {"gemma3_text": _gemma3, "smollm3": _smollm3}


def tokenizer_dir(gguf_path: Path, cache_dir: Path, header: GGUFHeader | None = None) -> Path:
    """A directory holding the GGUF's tokenizer and chat template as Hugging Face files (built once, cached by the
    tokenizer's own metadata: every quantization of a model shares it). `header`: the file's, if already read."""
    header = header or read_header(gguf_path)
    digest = header.tokenizer_digest
    target = cache_dir.expanduser() / "gguf-tokenizers" / digest
    if (target / "tokenizer_config.json").is_file():
        return target
    started = time.perf_counter()
    from transformers import AutoTokenizer

    tmp = temporary_for(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ValueError as exc:  # transformers knows the tokenizer but not this architecture (e.g. SmolLM3)
        if "not supported" not in str(exc):
            raise
        tmp.mkdir(parents=True)
        write_tokenizer_only(header, tmp / "tokenizer.gguf", "llama")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file="tokenizer.gguf")
        (tmp / "tokenizer.gguf").unlink()
    tokenizer.save_pretrained(tmp)
    publish_directory(tmp, target)
    log.info("tokenizer read from the GGUF", extra={"into": str(target),
                                                    "seconds": round(time.perf_counter() - started, 1)})
    return target


def export_hf_directory(gguf_path: Path, cache_dir: Path) -> Path:
    """A float32 Hugging Face copy of a GGUF made by transformers (cached): the reference the tests and the
    Hugging Face peers of loadtests run. Not used to serve."""
    target = cache_dir.expanduser() / "hf-export" / file_key(gguf_path)
    if (target / "loom-exported.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    tmp = temporary_for(target)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    model.hf_quantizer = None  # the weights are plain float tensors now: save them as such
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir(gguf_path, cache_dir).iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / "loom-exported.json").write_text(json.dumps({"source": str(gguf_path)}))
    publish_directory(tmp, target)
    return target
