"""Qwen3, SmolLM3, Phi-3 (fused checkpoint tensors, partial rotary, LongRoPE) and Gemma 3 (sliding-window and global
layers) against transformers on tiny random checkpoints: the parsed config, float32 logits and greedy tokens through
the engine (a batch of prompts on the paged KV cache, prompts longer than the prefill chunk and than the sliding
windows, prefix-cache hits), the quantized CPU path and its one-call C++ decode stack, and the Triton kernels
(interpreter on CPU).

Phi-3 comes twice: a long-context model (max positions past the pretraining length: the long LongRoPE factors) run
on prompts longer than its pretraining length, and one whose context is the pretraining length (short factors, an
explicit attention factor); rope.py says why those are the contexts where Loom and transformers agree."""
from __future__ import annotations

import importlib
import shutil

import pytest
import torch

from loom_kernels.fused_cpu.decode_stack import decode_stack_available
from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import FlatBatch, KVCache, ModelSettings, UnsupportedModelError, load_model
from server.model.config import ModelConfig
from server.model.weights.quant import QuantLinear
from tests.support.models import hf_greedy, hf_model, random_prompts

VOCAB = 1024  # ids the default model's tokenizer has; small, so the head and embedding cost little
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {
    # head_dim 32 over a hidden size of 64: q/k/v are wider than the hidden state, as in Qwen3-0.6B
    "qwen3": dict(cls="Qwen3Config", num_hidden_layers=2, head_dim=32),
    # NoPE on layers 1 and 3; with a window, those layers slide
    "smollm3": dict(cls="SmolLM3Config", num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True,
                    sliding_window=24),
    # 8 of each head's 16 features rotate; pretraining length 64 of 512 positions; every layer slides over 48
    "phi3": dict(cls="Phi3Config", num_hidden_layers=2, original_max_position_embeddings=64, partial_rotary_factor=0.5,
                 sliding_window=48, rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2],
                                                  "long_factor": [1.5, 2.5, 4.0, 6.0]}),
    "phi3-short": dict(cls="Phi3Config", num_hidden_layers=2, max_position_embeddings=256,
                       original_max_position_embeddings=256, partial_rotary_factor=0.75,
                       rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                     "long_factor": [2.0] * 6, "attention_factor": 1.2}),
    # local layers 0 and 2 (window 16, base 5000), global 1 and 3 (linear scaling); Gemma's scale and capping
    "gemma3": dict(cls="Gemma3TextConfig", num_hidden_layers=4, head_dim=32, sliding_window=16,
                   sliding_window_pattern=2, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=5000.0),
    # the Llama family's windows: Mistral's on every layer, Qwen2's from max_window_layers on
    "mistral": dict(cls="MistralConfig", num_hidden_layers=2, sliding_window=24),
    "qwen2": dict(cls="Qwen2Config", num_hidden_layers=2, use_sliding_window=True, sliding_window=24,
                  max_window_layers=1),
}
# Past the prefill chunk (32 tokens a step below) and every window; the long Phi-3 past its pretraining length.
PROMPT_LENGTHS = {"phi3": [66, 81, 101]}
DEFAULT_LENGTHS = [5, 23, 47, 70]
ENGINE = dict(block_size=16, max_num_batched_tokens=32)


def prompts_for(arch: str, seed: int = 1) -> list[list[int]]:
    lengths = PROMPT_LENGTHS.get(arch, DEFAULT_LENGTHS)
    return [random_prompts(1, n, n, vocab=VOCAB, seed=seed + i)[0] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and a second one spin-waiting on a busy two-core machine made
    this file 5x slower (transformers and Loom alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_checkpoint):
    """Tiny random float32 checkpoints of each architecture, with the default model's tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("archs")
    paths = {}
    for name, spec in ARCHS.items():
        spec = {**COMMON, **spec}
        cfg = getattr(transformers, spec.pop("cls"))(**spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # norms away from their init (1, or 0 for Gemma's 1 + w) so loading them wrongly shows
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.1)
                    if "norm" in pname and not name.startswith("gemma"):
                        p.add_(1.0)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (default_checkpoint / f).exists():
                shutil.copy(default_checkpoint / f, paths[name] / f)
    return paths


@pytest.fixture(scope="module")
def loom_fp32(checkpoints):
    return {name: load_model(ModelSettings(model=str(path), dtype="float32", quantization="none"), progress=False)
            for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {name: hf_model(path) for name, path in checkpoints.items()}


def prefill_logits(lm, ids: list[int], block_size: int = 16) -> torch.Tensor:
    cfg = lm.config
    blocks = -(-len(ids) // block_size)
    cache = KVCache.allocate(cfg.num_layers, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, lm.dtype)
    batch = FlatBatch.build([(ids, 0, list(range(blocks)))], [], block_size, logits_rows=list(range(len(ids))))
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(batch, cache))


def greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [r[0].token_ids for r in generate(core, prompts, params)]


def test_configs_parse(loom_fp32):
    cfg = {name: lm.config for name, lm in loom_fp32.items()}
    assert {c.family for c in cfg.values()} == {"qwen3", "smollm3", "phi3", "gemma3", "llama"}
    assert [cfg["mistral"].layer_window(i) for i in range(2)] == [24, 24]
    assert [cfg["qwen2"].layer_window(i) for i in range(2)] == [None, 24]
    assert cfg["qwen3"].head_dim == 32 and cfg["qwen3"].layer_types == ["full_attention"] * 2
    assert cfg["smollm3"].no_rope_layers == [1, 0, 1, 0] and cfg["smollm3"].tie_word_embeddings
    assert [cfg["smollm3"].layer_window(i) for i in range(4)] == [None, 24, None, 24]
    assert cfg["phi3"].rotary_dim == 8 and cfg["phi3"].rope_scaling["original_max_position_embeddings"] == 64
    assert [cfg["phi3"].layer_window(i) for i in range(2)] == [48, 48]
    assert cfg["phi3-short"].rotary_dim == 12 and cfg["phi3-short"].rope_scaling["attention_factor"] == 1.2
    g = cfg["gemma3"]
    assert g.layer_types == ["sliding_attention", "full_attention"] * 2 and g.rope_local_theta == 5000.0
    assert g.rope_scaling["rope_type"] == "linear" and g.query_pre_attn_scalar == 24
    assert g.activation == "gelu_pytorch_tanh" and g.final_logit_softcapping == 30.0
    assert all(c.max_model_len == c.max_position_embeddings for c in cfg.values())  # windows run, no cap


BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 6}


def test_hub_style_configs_parse():
    """The shapes configs have on the Hub, written before transformers 5 (flat rope keys, pattern integers)."""
    gemma = ModelConfig.from_dict({**BASE, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                                   "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None,
                                   "sliding_window": 512, "sliding_window_pattern": 3, "query_pre_attn_scalar": 256,
                                   "hidden_activation": "gelu_pytorch_tanh", "eos_token_id": [1, 106]})
    assert gemma.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.rope_scaling, gemma.tie_word_embeddings) == (
        1e6, 1e4, None, True)
    phi = ModelConfig.from_dict({**BASE, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
                                 "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
                                 "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6},
                                 "sliding_window": 262144})
    assert phi.rope_scaling["rope_type"] == "longrope" and phi.rotary_dim == 12 and phi.max_model_len == 131072
    smol = ModelConfig.from_dict({**BASE, "architectures": ["SmolLM3ForCausalLM"], "rope_theta": 5e6,
                                  "no_rope_layer_interval": 3, "use_sliding_window": False, "sliding_window": 64})
    assert smol.no_rope_layers == [1, 1, 0, 1, 1, 0] and smol.layer_types == ["full_attention"] * 6
    qwen = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True,
                                  "sliding_window": 32, "max_window_layers": 4})
    assert [qwen.layer_window(i) for i in range(6)] == [None] * 4 + [32, 32]


@pytest.mark.parametrize("raw,match", [
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "image-text"),
    ({"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu"}, "activation"),
    ({"architectures": ["Gemma3ForCausalLM"], "rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0}, "full_attention": {}}}, "local layers"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "longrope"}}, "longrope"),
    ({"architectures": ["LlamaForCausalLM"], "partial_rotary_factor": 0.5}, "partial rotary"),
])
def test_unsupported_variants_are_refused(raw, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_dict({**BASE, **raw})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_logits_match_hf(arch, loom_fp32, hf_models):
    ids = prompts_for(arch)[-1]
    with torch.no_grad():
        expected = hf_models[arch](torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(prefill_logits(loom_fp32[arch], ids), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf_through_the_engine(arch, loom_fp32, hf_models):
    """A batch of prompts (chunked prefill of the long ones, windows exceeded), then prompts sharing their first
    blocks: prefill continues from the cached prefix."""
    hf, core = hf_models[arch], EngineCore(loom_fp32[arch], EngineSettings(kv_cache_memory=0.05, **ENGINE))
    prompts = prompts_for(arch)
    assert greedy(core, prompts, 16) == [hf_greedy(hf, p, 16) for p in prompts]
    again = [p[:64] + q for p, q in zip(prompts[-2:], random_prompts(2, 5, 5, vocab=VOCAB, seed=9))]
    assert greedy(core, again, 16) == [hf_greedy(hf, p, 16) for p in again]
    assert core.scheduler.prefix_hit_tokens > 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"


@pytest.mark.parametrize("arch,dtype", [("qwen3", "bfloat16"), ("phi3", "float32"), ("gemma3", "bfloat16")])
def test_quantized_cpu_path(arch, dtype, checkpoints, loom_fp32, tmp_path):
    """q8 at load: every linear quantized (Phi-3's fused checkpoint tensors as they are), the norms of q/k and
    Gemma's four per layer filled by name, logits close to float32's (bf16 activations take the C++ RMSNorm and
    rotary on q/k heads); the C++ decode stack is taken."""
    ref = loom_fp32[arch]
    lm = load_model(ModelSettings(model=str(checkpoints[arch]), dtype=dtype, quantization="q8",
                                  cache_dir=tmp_path, kernel_calibration=False), progress=False)
    assert lm.quantization == "q8"
    assert isinstance(lm.model.model.layers[0].self_attn.qkv_proj, QuantLinear)
    params = dict(ref.model.named_parameters())
    for name, p in lm.model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, params[name].to(p.dtype)), name
    ids = prompts_for(arch)[-1]
    want, got = prefill_logits(ref, ids), prefill_logits(lm, ids)
    assert (got - want).abs().mean() < 0.05 * want.std()  # 8-bit weights: a few percent of the logits' spread
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    cfg = lm.config
    cache = KVCache.allocate(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim, lm.dtype)
    assert lm.model.enable_decode_stack(cache) == decode_stack_available()
    assert len(greedy(EngineCore(lm, EngineSettings(kv_cache_memory=0.05, **ENGINE)), prompts_for(arch), 4)[0]) == 4


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_triton_kernels_give_the_reference_tokens(arch, checkpoints, kernel_env, monkeypatch):
    """The Triton kernels (the interpreter here) with sliding windows, GeGLU and q/k norms (Gemma 3; Qwen3's through
    the Triton RMSNorm): the same greedy tokens as the PyTorch path, prefill and decode kernels both run."""
    kernel_env("triton")
    lm = load_model(ModelSettings(model=str(checkpoints[arch]), dtype="float32", quantization="none"), progress=False)
    prompts = [p[:40] for p in prompts_for(arch)[1:3]]  # 23 and 40 tokens: past the window, and the 32-token chunk
    calls = {"decode": 0, "prefill": 0}
    for kind in calls:
        module = importlib.import_module(f"loom_kernels.attention.{kind}_triton")
        original = getattr(module, f"paged_attention_{kind}_triton")

        def counting(*args, _kind=kind, _original=original, **kw):
            calls[_kind] += 1
            return _original(*args, **kw)
        monkeypatch.setattr(module, f"paged_attention_{kind}_triton", counting)
    via_triton = greedy(EngineCore(lm, EngineSettings(kv_cache_memory=0.05, **ENGINE)), prompts, 4)
    assert calls["decode"] > 0 and calls["prefill"] > 0, "the Triton kernels did not run"
    kernel_env("torch")
    assert via_triton == greedy(EngineCore(lm, EngineSettings(kv_cache_memory=0.05, **ENGINE)), prompts, 4)


@pytest.mark.skipif(not decode_stack_available(), reason="no C++ compiler for the CPU kernels")
@pytest.mark.parametrize("arch", ["qwen3", "smollm3", "phi3", "phi3-short", "mistral", "qwen2", "gemma3"])
def test_quantized_decode_steps_take_the_cpu_stack(arch, checkpoints, tmp_path, monkeypatch):
    """q8 weights (so float32 activations take the stack too): the decode steps run on the C++ stack, with Qwen3's
    q/k norms, SmolLM3's NoPE layers, Phi-3's partial rotary, the windows (prompts and 16 new tokens past every
    window) and Gemma 3's layer, and give the tokens of the Python layer loop over the same loaded model."""
    lm = load_model(ModelSettings(model=str(checkpoints[arch]), dtype="float32", quantization="q8",
                                  cache_dir=tmp_path, kernel_calibration=False), progress=False)
    prompts = prompts_for(arch)
    with_stack = greedy(EngineCore(lm, EngineSettings(kv_cache_memory=0.05, **ENGINE)), prompts, 16)
    assert lm.model.decode_stacks is not None and lm.model.decode_stacks.by_size  # decode steps ran on it
    monkeypatch.setattr("server.model.llama.wants_stack", lambda model, cache: False)  # the next engine: Python loop
    without = greedy(EngineCore(lm, EngineSettings(kv_cache_memory=0.05, **ENGINE)), prompts, 16)
    assert lm.model.decode_stacks is None
    assert with_stack == without


@pytest.mark.parametrize("arch,groups", [("gemma3", 2), ("qwen2", 2), ("smollm3", 2)])
def test_mixed_window_models_give_back_what_slid_out_of_their_windows(arch, groups, loom_fp32, hf_models):
    """Windowed and full-attention layers in one model: a KV group per kind over one pool of pages. Through a long
    generation each windowed group's table holds about a window's worth of pages while the full group's grows with
    the context; the tokens are transformers', and every page comes back."""
    core = EngineCore(loom_fp32[arch], EngineSettings(kv_cache_memory=0.05, **ENGINE))
    layout, bs = core.runner.layout, ENGINE["block_size"]
    assert layout is not None and layout.num_groups == groups and core.runner.kv_cache.layout is layout
    prompt = prompts_for(arch)[-1]
    held = []  # after each decode step: (computed tokens, the full group's pages, the most a windowed group holds)

    def record() -> None:
        for seq in core.scheduler.running:
            if seq.num_output_tokens > 1:
                local = max(len(t.block_table) - t.num_released_blocks for t in seq.group_tables)
                held.append((seq.num_computed_tokens, len(seq.block_table) - seq.num_released_blocks, local))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    (out,) = generate(core, [prompt], params, on_step=record)
    assert out[0].token_ids == hf_greedy(hf_models[arch], prompt, 60)
    window = max(w for w in layout.group_window if w is not None)
    assert all(full == -(-computed // bs) for computed, full, _ in held)  # the full group: the whole context
    assert held[-1][0] > len(prompt) + 50 and held[-1][1] >= 8
    assert max(local for *_, local in held) <= -(-window // bs) + 2  # the window, a partial block, the hash parent
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV pages leaked"
