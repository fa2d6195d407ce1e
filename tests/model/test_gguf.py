"""GGUF files read as stored: tiny decoders written with gguf-py under llama.cpp's names and metadata keys, weights as
random blocks of the types Q4_K_M / Q5_K_M files mix, against transformers running the same weights de-quantized by
gguf-py (float32).

Tolerances: the block kernels accumulate in float32 in another order than a float32 GEMM over the de-quantized
weights, so logits differ by ~1e-5 relative; greedy tokens are compared exactly (the tiny models' top-2 gaps are far
larger). The de-quantized dense path is the same math as transformers: exact tokens, logits within 2e-4."""
import logging
import shutil

import pytest
import torch

from loom_kernels.quant import gguf_kernels_available
from server.model import ModelSettings, load_model
from server.model.loader import default_gguf
from server.model.weights.gguf import tokenizer_dir
from server.model.weights.gguf_file import read_header
from server.model.weights.quant import QuantLinear, resident_weight_bytes
from tests.support.gguf_files import write_gguf, write_hf_directory
from tests.support.models import hf_greedy, hf_model, loom_greedy, random_prompts

pytestmark = pytest.mark.skipif(not gguf_kernels_available(), reason="no C++ compiler for the GGUF kernels")

Q4_K_M = {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "attn_k": "Q5_0", "attn_output": "Q4_0",
          "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "token_embd": "Q6_K", "output": "Q5_K"}
CODE_TYPES = ("gguf:Q4_0", "gguf:Q4_1", "gguf:Q8_0")
Q5_K_M = {"default": "Q5_K", "attn_v": "Q6_K", "ffn_down": "Q4_1", "attn_q": "Q5_1", "token_embd": "Q8_0"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache dir for the module. Every tiny file carries the default model's tokenizer: its Hugging Face files
    are copied in from the user's cache, where loading the default model builds them once (~13 s; that build is
    tested in test_loader.py)."""
    cache, user_cache = tmp_path_factory.mktemp("cache"), ModelSettings().cache_dir.expanduser()
    built = tokenizer_dir(default_gguf(), user_cache)
    shutil.copytree(built, cache / built.relative_to(user_cache))
    return cache


@pytest.fixture(scope="module")
def tokenizer(cache):
    return tokenizer_dir(default_gguf(), cache)


@pytest.fixture(scope="module", params=[("llama", Q4_K_M, False), ("llama", Q5_K_M, True)], ids=["q4_k_m", "q5_k_m"])
def llama_gguf(request, tmp_path_factory, tokenizer):
    arch, types, tied = request.param
    root = tmp_path_factory.mktemp(f"gguf-{arch}")
    tiny = write_gguf(root / "tiny.gguf", arch, types, tied=tied, tokenizer_dir=tokenizer)
    return tiny, write_hf_directory(tiny, root / "hf")


def loom(path, **kw):
    """Loom on `path` in float32; the heuristic kernel plan (calibration is timed elsewhere and costs seconds)."""
    return load_model(ModelSettings(model=str(path), dtype="float32", kernel_calibration=False, **kw),
                      progress=False)


def test_kquant_gguf_greedy_matches_transformers(llama_gguf, cache):
    tiny, hf_dir = llama_gguf
    lm, hf = loom(tiny.path, quantization="gguf", cache_dir=cache), hf_model(hf_dir)
    assert lm.quantization == "gguf"
    prompts = random_prompts(3, 5, 40, seed=3)
    for prompt, got in zip(prompts, loom_greedy(lm, prompts, 16)):
        assert got == hf_greedy(hf, prompt, 16)
    with torch.no_grad():
        expected = hf(torch.tensor([prompts[0]])).logits[0, -1]
    ours = loom_greedy_logits(lm, prompts[0])
    torch.testing.assert_close(ours, expected, atol=1e-3 * expected.abs().max().item(), rtol=0)


def loom_greedy_logits(lm, prompt: list[int]) -> torch.Tensor:
    from server.model import FlatBatch, KVCache
    cfg = lm.config
    cache = KVCache.allocate(cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    batch = FlatBatch.build([(prompt, 0, list(range(8)))], [], 16)
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(batch, cache))[-1]


def test_dequantized_gguf_is_transformers_exactly(llama_gguf, cache):
    tiny, hf_dir = llama_gguf
    lm, hf = loom(tiny.path, quantization="none", cache_dir=cache), hf_model(hf_dir)
    prompts = random_prompts(2, 5, 30, seed=4)
    for prompt, got in zip(prompts, loom_greedy(lm, prompts, 16)):
        assert got == hf_greedy(hf, prompt, 16)


def test_gguf_runs_its_own_blocks_within_the_memory_budget(llama_gguf, tmp_path, tokenizer, cache):
    tiny, _ = llama_gguf
    stored = read_header(tiny.path).tensor_bytes()
    shutil.copytree(tokenizer, tmp_path / tokenizer.relative_to(cache))  # its tokenizer is built elsewhere (~5 s)
    lm = loom(tiny.path, quantization="gguf", cache_dir=tmp_path)
    assert resident_weight_bytes(lm.model) <= 1.3 * stored  # the default budget; dense copies only where they fit
    # nothing but the tokenizer and the kernel plan is written: no converted or re-quantized copy of the weights
    assert not any(f.suffix == ".safetensors" for f in tmp_path.rglob("*"))
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 20e6
    lean = loom(tiny.path, quantization="gguf", cache_dir=tmp_path, weight_memory=1.0)
    linears = [m for m in lean.model.modules() if isinstance(m, QuantLinear)]
    for m in linears:  # the file's blocks (for Q4_0/Q4_1/Q8_0 maybe the same codes re-laid), no dense copy
        codes = {"q4_blocks", "q8_blocks", "q4", "q8"} if m.quant_kind in CODE_TYPES else set()
        allowed = {"gguf_blocks", "gguf_tiled"} | codes
        assert {b for _, b in m.plan} <= allowed, (m.quant_kind, m.plan)
    assert resident_weight_bytes(lean.model) <= 1.05 * stored


def test_types_without_a_kernel_load_through_one_logged_fallback(tmp_path, cache, tokenizer, caplog):
    tiny = write_gguf(tmp_path / "q3.gguf", "llama", {"default": "Q4_K", "ffn_down": "Q3_K", "attn_v": "Q2_K"},
                      tokenizer_dir=tokenizer)
    with caplog.at_level(logging.WARNING, logger="loom.model"):
        lm = loom(tiny.path, quantization="gguf", cache_dir=cache)
    (record,) = [r for r in caplog.records if "without a Loom kernel" in r.getMessage()]
    assert set(record.types) == {"Q3_K", "Q2_K"} and "blk.0.ffn_down.weight" in record.types["Q3_K"]
    assert record.tensors == 4
    downs = [m for n, m in lm.model.named_modules() if n.endswith("down_proj")]
    assert all(m.quant_kind == "q4" for m in downs)  # re-quantized once, to Loom's 4-bit blocks
    assert len(loom_greedy(lm, random_prompts(1, 5, 10), 4)[0]) == 4


ARCHS = {  # architecture -> (types, tied, shape changes): each loads from llama.cpp's names and metadata
    "qwen2": ({"default": "Q4_K", "attn_v": "Q6_K", "token_embd": "Q8_0"}, True, {}),
    "qwen3": ({"default": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"}, True, {}),
    "gemma3": ({"default": "Q5_K", "attn_v": "Q6_K", "token_embd": "Q8_0"}, True, {"sliding_window": 16}),
    "phi3": ({"default": "Q4_K", "attn_qkv": "Q5_K", "token_embd": "Q8_0", "output": "Q6_K"}, False, {}),
    "smollm3": ({"default": "Q4_K", "attn_v": "Q6_K", "token_embd": "Q8_0"}, True, {"layers": 4}),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_gguf_matches_transformers(arch, tmp_path, cache, tokenizer):
    from tests.support.gguf_files import TinyShape
    types, tied, shape = ARCHS[arch]
    tiny = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, types, TinyShape(**shape), tied=tied,
                      tokenizer_dir=tokenizer)
    hf = hf_model(write_hf_directory(tiny, tmp_path / "hf"))
    lm = loom(tiny.path, quantization="gguf", cache_dir=cache)
    assert lm.config.family == {"qwen2": "llama"}.get(arch, arch)
    prompts = random_prompts(2, 20, 40, seed=5)  # longer than Gemma's 16-token window
    for prompt, got in zip(prompts, loom_greedy(lm, prompts, 12)):
        assert got == hf_greedy(hf, prompt, 12)


def test_llama3_rope_frequency_factors_from_the_file(tmp_path, cache, tokenizer):
    """llama.cpp stores Llama 3's rope scaling as per-frequency divisors (`rope_freqs.weight`), not as config."""
    import math

    import numpy as np

    from tests.support.gguf_files import TinyShape
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    shape = TinyShape(rope_base=500000.0)
    factors = []
    for i in range(0, shape.head_dim, 2):  # convert_hf_to_gguf's rope_freqs for this scaling
        wavelen = 2 * math.pi / (1.0 / shape.rope_base ** (i / shape.head_dim))
        low, high = 64 / 1.0, 64 / 4.0
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    shape.extra_tensors = {"rope_freqs.weight": np.array(factors, dtype=np.float32)}
    tiny = write_gguf(tmp_path / "tiny-llama3.gguf", "llama", {"default": "Q4_K", "token_embd": "Q8_0"}, shape,
                      tokenizer_dir=tokenizer)
    tiny.rope_scaling = scaling
    hf = hf_model(write_hf_directory(tiny, tmp_path / "hf"))
    lm = loom(tiny.path, quantization="gguf", cache_dir=cache)
    assert lm.config.rope_scaling["rope_type"] == "factors"
    prompts = random_prompts(2, 60, 90, seed=6)  # past the 64-token pretraining length
    for prompt, got in zip(prompts, loom_greedy(lm, prompts, 12)):
        assert got == hf_greedy(hf, prompt, 12)
