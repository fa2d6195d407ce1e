"""Shared fixtures: tiny random Hugging Face checkpoints (saved as safetensors) and the default model, loaded once."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton reads this when its kernels are defined, so it must be set before any is imported. CPU tensors still take
# the PyTorch reference unless a test also sets LOOM_KERNELS=triton (see loom_kernels/backend.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.model import ModelSettings, load_model
from server.model.loader import hf_reference_directory
from tests.support.encoders import encoder_engine, hf_minilm, minilm_dir, minilm_fp32, tiny_classifiers  # noqa: F401
from tests.support.models import TINY_CONFIGS
from tests.support.servers import make_engine


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The default model as a Hugging Face directory (converted from its GGUF once, cached in ~/.cache/loom)."""
    return hf_reference_directory("default", ModelSettings().cache_dir)


@pytest.fixture(scope="session")
def default_model_fp32():
    return load_model(ModelSettings(model="default", dtype="float32"), progress=False)


@pytest.fixture(scope="session")
def hf_default_fp32(default_checkpoint):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, default_checkpoint) -> dict[str, Path]:
    """Random tiny checkpoints of every supported family, with the default model's tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for name, spec in TINY_CONFIGS.items():
        spec = dict(spec)
        cfg = getattr(transformers, spec.pop("cls"))(vocab_size=49152, bos_token_id=1, eos_token_id=2, **spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # perturb norms and biases away from 1 / 0 so loading them wrongly shows
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.1)
                    if "norm" in pname or ".ln_" in pname:
                        p.add_(1.0)
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (default_checkpoint / f).exists():
                shutil.copy(default_checkpoint / f, path / f)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def dummy_lm():
    return load_model(ModelSettings(model="dummy:tiny"), progress=False)


@pytest.fixture(scope="session")
def dummy_engine(dummy_lm):
    engine = make_engine(dummy_lm)
    yield engine
    engine.shutdown()
