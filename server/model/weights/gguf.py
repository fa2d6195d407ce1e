"""GGUF -> Hugging Face directory, once. transformers de-quantizes the GGUF (~15 s for the default model) and we save
safetensors + tokenizer files into a cache directory keyed by the file's identity, so later starts load in ~1 s."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("loom.model")


def cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Directory holding the converted checkpoint, converting on first use."""
    target = cache_dir / cache_key(gguf_path)
    if (target / "loom-converted.json").exists():
        return target
    log.info("converting GGUF once", extra={"gguf": str(gguf_path), "into": str(target)})
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    # The de-quantized weights are plain float tensors; drop the GGUF quantizer so save_pretrained writes them as is.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "loom-converted.json").write_text(json.dumps({"source": str(gguf_path), "seconds":
                                                          round(time.perf_counter() - started, 1)}))
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)
    log.info("converted GGUF", extra={"seconds": round(time.perf_counter() - started, 1)})
    return target
