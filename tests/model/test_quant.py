"""The quantized CPU path: GGUF blocks decode to exactly transformers' de-quantized weights, every linear backend
matches the de-quantize + float32 reference, safetensors quantize at load, and the quantized default model stays
close to the de-quantized float32 model (top-1 agreement, perplexity through the engine's prompt logprobs). The
full-size accuracy check (32 prompts x 64 tokens) is `python -m tests.support.quant_accuracy`."""
import json

import pytest
import torch
import torch.nn.functional as F

from loom_kernels.cpu.platform import cpu_info
from loom_kernels.fused_cpu.decode_stack import decode_stack_available
from loom_kernels.quant import block_kernels_available, concat_gguf_blocks, quantize_q4
from loom_kernels.quant.test_kquants import random_blocks
from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate as offline_generate
from server.model import ModelSettings, load_model
from server.model.loader import default_gguf
from server.model.weights import calibrate
from server.model.weights.calibrate import group_linears, int8_scope, plan_kernels
from server.model.weights.gguf_file import read_header
from server.model.weights.gguf_tensors import QTensor
from server.model.weights.quant import QuantEmbedding, QuantLinear, backends_for
from server.model.weights.quant_load import gguf_tensors, resolve_mode
from server.model.weights.quant_load import load as load_quantized
from tests.support.quant_accuracy import Reference, every_linear_on


def q4_source(n: int, k: int, seed: int = 0) -> QTensor:
    torch.manual_seed(seed)
    codes, scale, zero = quantize_q4(torch.randn(n, k) * 0.05, 32)
    return QTensor("q4", "test", codes=codes, scale=scale, zero=zero)


def test_gguf_blocks_decode_to_transformers_weights(default_checkpoint, default_model_fp32):
    from safetensors import safe_open
    tensors = gguf_tensors(read_header(default_gguf()), "gguf", default_model_fp32.config)
    (path,) = default_checkpoint.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as h:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            assert tensors[name].kind == "gguf"  # the file's blocks, not a copy in another form
            # exact: the same f16 scales times the same codes (q/k rows un-permuted like transformers does)
            assert torch.equal(tensors[name].dequantize(), h.get_tensor(name).float()), name


def q8_source(n: int, k: int, seed: int = 0) -> QTensor:
    """A Q8_0 weight: int8 codes, one scale per 32-weight block."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return QTensor("q8", "test", codes=codes, scale=torch.rand(n, -(-k // 32), generator=gen) * 4e-4)


@pytest.mark.parametrize("n,k,kind", [(96, 64, "q4"), (40, 96, "q4"), (40, 96, "q8"), (33, 64, "q8")])
def test_quant_linear_backends_match_reference(n, k, kind):
    src = (q4_source if kind == "q4" else q8_source)(n, k)
    ref_w = src.dequantize()
    lin = QuantLinear(src, bias=torch.randn(n))
    backends = backends_for(src, torch.ops.mkldnn._is_mkldnn_bf16_supported(), True, block_kernels_available())
    assert set(backends) >= {kind, "f32"} and (f"{kind}_blocks" in backends) == block_kernels_available()
    for m in (1, 5, 40):
        x = torch.randn(m, k)
        ref = F.linear(x, ref_w, lin.bias)
        for backend in backends + ["bf16"]:
            lin.build(backend)
            got = lin.run(x, backend)
            # f32 exact up to summation order; bf16 activations/weights or float16 block scales: ~2^-8 relative of
            # sqrt(K) * |x| * |w|
            tol = 1e-5 if backend == "f32" else 0.02 * k ** 0.5 * ref_w.abs().max().item()
            torch.testing.assert_close(got, ref, atol=tol, rtol=0.02, msg=backend)


def test_quant_linear_follows_its_plan_and_drops_unused_forms():
    lin = QuantLinear(q4_source(48, 64))
    lin.keep_only([(8, "q4"), (512, "f32")])
    assert set(lin.forms) == {"q4", "f32"} and lin.source is None
    assert [lin.pick(m) for m in (1, 8, 9, 512, 4096)] == ["q4", "q4", "f32", "f32", "f32"]
    assert [lin.pick(m, decode=True) for m in (1, 9)] == ["q4", "f32"]  # no decode plan: the same plan


def test_decode_plan_is_picked_in_decode_steps_and_keeps_its_forms():
    lin = QuantLinear(QTensor("gguf", "Q4_K", blocks=random_blocks("Q4_K", 16, 256, seed=0)))
    lin.keep_only([(512, "gguf_blocks")], [(4, "gguf_q8"), (512, "gguf_blocks")])
    assert set(lin.forms) == {"gguf_blocks", "gguf_q8"} and lin.forms["gguf_q8"] is lin.forms["gguf_blocks"]
    assert [lin.pick(m) for m in (1, 4, 5)] == ["gguf_blocks"] * 3
    assert [lin.pick(m, decode=True) for m in (1, 4, 5)] == ["gguf_q8", "gguf_q8", "gguf_blocks"]


def test_int8_scope_follows_the_setting_and_the_cpu():
    assert int8_scope("auto", native_bf16=False) == "decode"  # float32 activations otherwise: decoding on int8
    assert int8_scope("auto", native_bf16=True) == "none"
    assert int8_scope("int8", native_bf16=True) == "all" and int8_scope("float", native_bf16=False) == "none"


@pytest.mark.parametrize("scope", ["none", "decode", "all"])
def test_calibration_offers_int8_only_within_its_scope(monkeypatch, scope):
    """Made-up timings: int8 is fastest at M <= 8, the float kernels above. "decode" keeps every step's plan on
    float forms and takes int8 into the decode plan only where it measured faster."""
    times = {1: (1.0, 2.0, 0.5), 8: (2.0, 3.0, 1.5), 16: (4.0, 3.0, 3.5)}  # gguf_blocks, gguf_tiled, gguf_q8
    def measure(mods, candidates, dtype):
        assert ("gguf_q8" in candidates) == (scope != "none")
        return {m: {b: t for b, t in zip(("gguf_blocks", "gguf_tiled", "gguf_q8"), ts) if b in candidates}
                for m, ts in times.items()}
    monkeypatch.setattr(calibrate, "measure_group", measure)
    mods = [QuantLinear(QTensor("gguf", "Q8_0", blocks=random_blocks("Q8_0", 16, 64, seed=0)))]
    info = cpu_info()
    step, decode, used = calibrate.choose(mods, info, torch.float32, True, False, 0.0, {}, "k", scope)
    float_choice = {1: "gguf_blocks", 8: "gguf_blocks", 16: "gguf_tiled"}
    int8_choice = {1: "gguf_q8", 8: "gguf_q8", 16: "gguf_tiled"}
    assert used == 0.0
    assert step == (int8_choice if scope == "all" else float_choice)
    assert decode == (float_choice if scope == "none" else int8_choice)


def test_quant_embedding_gathers_dequantized_rows():
    src = q4_source(100, 64)
    emb = QuantEmbedding(src, torch.float32)
    ids = torch.tensor([3, 99, 0, 3])
    assert torch.equal(emb(ids), src.dequantize()[ids])


def test_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", "auto", True, cpu, "llama") == "gguf"
    assert resolve_mode("auto", "float32", True, cpu, "llama") == "none"  # float32 stays HF-identical
    assert resolve_mode("auto", "auto", False, cpu, "llama") == "none"  # safetensors as they are
    assert resolve_mode("q4", "float32", False, cpu, "llama") == "q4"
    assert resolve_mode("auto", "auto", True, cuda, "llama") == "none"
    assert resolve_mode("q4", "auto", False, cpu, "gpt2") == "none"
    with pytest.raises(ValueError):
        resolve_mode("gguf", "auto", False, cpu, "llama")


def test_safetensors_quantized_at_load_and_cached(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    ref = load_model(ModelSettings(model=str(path), dtype="float32", cache_dir=tmp_path), progress=False)
    q = load_model(ModelSettings(model=str(path), dtype="float32", quantization="q4", cache_dir=tmp_path,
                                 kernel_calibration=False), progress=False)
    assert q.quantization == "q4" and isinstance(q.model.model.layers[0].mlp.down_proj, QuantLinear)
    (cached,) = (tmp_path / "quantized").glob("*-q4-*.safetensors")
    stored = load_quantized(cached)  # every linear's 4-bit codes, as the model holds them
    assert {n for n, t in stored.items() if t.kind == "q4"} >= {"model.layers.0.mlp.down_proj.weight",
                                                                "model.layers.1.self_attn.o_proj.weight"}
    down, w = q.model.model.layers[0].mlp.down_proj, stored["model.layers.0.mlp.down_proj.weight"].dequantize()
    x = torch.randn(3, down.in_features)  # the 4-bit kernels take bf16 activations: tolerance as in the backend test
    torch.testing.assert_close(down(x), F.linear(x, w), rtol=0.02, atol=0.02 * w.shape[1] ** 0.5 * w.abs().max())
    again = load_model(ModelSettings(model=str(path), dtype="float32", quantization="q4", cache_dir=tmp_path),
                       progress=False)  # from the cache; calibrates and caches the plan
    (plan_file,) = (tmp_path / "kernels").glob("*.json")
    assert set(json.loads(plan_file.read_text())["plans"]) == set(group_linears(again.model))
    assert plan_kernels(again.model, torch.float32, tmp_path) == {  # second time: read back from the cache
        g: m.plan for g, (m, *_) in group_linears(again.model).items()}
    from server.model.batch import FlatBatch, KVCache
    cfg = ref.config
    ids = list(range(5, 40))
    logits = []
    for lm in (ref, q, again):
        cache = KVCache.allocate(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
        batch = FlatBatch.build([(ids, 0, list(range(4)))], [], 16, logits_rows=list(range(len(ids))))
        with torch.no_grad():
            logits.append(lm.model.compute_logits(lm.model(batch, cache)))
    # 4-bit weights of a random tiny model: logits move by a few percent of their spread, not more
    spread = logits[0].std().item()
    assert (logits[1] - logits[0]).abs().mean().item() < 0.15 * spread
    torch.testing.assert_close(logits[2], logits[1], atol=0.05 * spread, rtol=0)


@pytest.fixture(scope="module")
def default_quantized():
    """The default model on its own GGUF blocks, every linear on its quantized form at every M (the prefill-sized
    batches of these checks would otherwise take the dense backends)."""
    lm = load_model(ModelSettings(model="default", dtype="bfloat16", quantization="gguf", linear_kernels="quantized"),
                    progress=False)
    for mod in lm.model.modules():
        if isinstance(mod, QuantLinear) and mod.quant_kind == "q4" or mod is lm.model.lm_head and cpu_info().fast_int8:
            assert mod.forms and all(f.startswith(mod.quant_kind) for f in mod.forms), mod  # q4 / q4_blocks
    return lm


@pytest.fixture(scope="module")
def fp32_reference(default_model_fp32) -> Reference:
    """The float32 model's greedy continuations of 6 chat prompts (24 tokens) and perplexity over 768 tokens."""
    return Reference.of(default_model_fp32, 6, 24, 768)


def test_default_quantized_top1_agreement_and_perplexity(fp32_reference, default_quantized):
    # bf16 activations alone (the dense bf16 model) give ~0.976 agreement on the full 32 x 64 check
    agree, ratio = fp32_reference.score(default_quantized)
    assert agree >= 0.93, f"top-1 agreement {agree:.3f}"
    assert abs(ratio - 1) < 0.01, f"perplexity {ratio:.4f} x float32's"


@pytest.fixture(scope="module")
def default_gguf_fp32():
    """The default model on its GGUF blocks with float32 activations (the default path on CPUs without bf16)."""
    return load_model(ModelSettings(model="default", dtype="float32", quantization="gguf", linear_kernels="quantized",
                                    kernel_calibration=False), progress=False)


@pytest.mark.parametrize("backend", ["gguf_blocks", "gguf_tiled", "q4_blocks"])
def test_float32_default_path_answers_paris_on_every_float_kernel(default_gguf_fp32, backend):
    """The France answer's first token leads 'L' by ~0.08 in logprob in float32, whichever float kernel runs the
    prefill and the decode (bf16 activations leave it within ~0.03 and the kernel decides)."""
    with every_linear_on(default_gguf_fp32, backend) as lm:
        core = EngineCore(lm, EngineSettings(kv_cache_memory=0.25))
        prompt = lm.tokenizer.encode_chat([{"role": "user", "content": CHAT[0]}])
        (france,) = offline_generate(core, [prompt], SamplingParams(max_tokens=8, temperature=0.0))
    assert "Paris" in france[0].text, france[0].text


def test_int8_activations_stay_close_to_float32(fp32_reference, default_gguf_fp32):
    """What `--activations int8` trades for speed, every linear on it at every batch size (the head too, whose
    logits stay float32 sums): top-1 agreement and perplexity against the de-quantized float32 model as for the
    float-activation path. (Greedy decoding of a knife-edge prompt can flip: with the prefill on int8 too, the France
    question answers "L'Étoile...", which is why int8 activations are not the default.)"""
    with every_linear_on(default_gguf_fp32, "gguf_q8") as lm:
        agree, ratio = fp32_reference.score(lm)
    assert agree >= 0.93, f"top-1 agreement {agree:.3f}"
    assert abs(ratio - 1) < 0.01, f"perplexity {ratio:.4f} x float32's"


@pytest.mark.skipif(not decode_stack_available(), reason="no C++ compiler for the CPU kernels")
def test_int8_decoding_after_a_float32_prompt_answers_paris(default_gguf_fp32):
    """What `--activations auto` runs on CPUs without native bf16: the prompt (so the first token) in float32,
    every decode step on the C++ stack with int8 activations, K/V kept in float16 (`--kv-cache-dtype auto`)."""
    with every_linear_on(default_gguf_fp32, "gguf_blocks", decode="gguf_q8") as lm:
        core = EngineCore(lm, EngineSettings(kv_cache_memory=0.25))
        assert core.runner.kv_cache.k[0].dtype == torch.float16
        prompt = lm.tokenizer.encode_chat([{"role": "user", "content": CHAT[0]}])
        (france,) = offline_generate(core, [prompt], SamplingParams(max_tokens=8, temperature=0.0))
        stacks = lm.model.decode_stacks
        assert stacks.by_forms and {kind for forms in stacks.by_forms for kind, *_ in forms} == {"gguf_q8"}
        for mod in lm.model.modules():  # the same blocks under another kernel: a stack of its own, not the int8 one
            if isinstance(mod, QuantLinear):
                mod.decode_plan = [(1 << 30, "gguf_blocks")]
        assert stacks._build(1) is not stacks.by_size[1] and len(stacks.by_forms) == 2
    assert "Paris" in france[0].text, france[0].text


def test_int8_activations_are_offered_only_where_allowed():
    source = QTensor("gguf", "Q4_K", blocks=random_blocks("Q4_K", 8, 256, seed=0))
    assert "gguf_q8" in backends_for(source, False, False, True, int8_activations=True)
    assert "gguf_q8" not in backends_for(source, False, False, True, int8_activations=False)
    assert "gguf_q8" not in backends_for(source, False, False, False, int8_activations=True)  # no kernels built
    assert "gguf_q8k" in backends_for(source, False, False, True, int8_activations=True)
    assert "gguf_q8k" not in backends_for(source, False, False, True, int8_activations=False)
    head = backends_for(source, False, False, True, int8_activations=True, float_output=True)
    assert "gguf_q8" in head and "gguf_q8k" in head  # int8 inputs, float32 logits
    assert "gguf_q8" not in backends_for(source, False, False, True, float_output=True)
    mixed = QTensor("gguf", "Q4_K", blocks=concat_gguf_blocks([random_blocks("Q4_K", 8, 256, seed=0),
                                                              random_blocks("Q8_0", 8, 256, seed=1)]))
    assert "gguf_q8" in backends_for(mixed, False, False, True, int8_activations=True)
    assert "gguf_q8k" not in backends_for(mixed, False, False, True, int8_activations=True)  # Q8_0 has no sub-scales


CHAT = ["What is the capital of France?", "Name three rivers.", "What is 2 + 2?", "Who wrote Hamlet?",
        "Give me a synonym for happy.", "What colour is the sky?", "Translate 'thank you' into Spanish.",
        "What is the largest planet?"]


def test_bf16_model_logits_are_float32_without_ties(default_quantized):
    """bf16 activations, the GGUF's own blocks: the head still writes float32, so the top candidates of real
    prompts do not tie (bf16 logits tied at 17 of 64 such positions, 'The' and 'L' both at -1.938 for France)."""
    lm, params = default_quantized, SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.25))
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in CHAT]
    outs = [o[0] for o in offline_generate(core, prompts, params)]
    ties = [(i, pos) for i, o in enumerate(outs) for pos, lp in enumerate(o.logprobs)
            if len({v for _, v in lp.top}) < len(lp.top)]
    assert not ties, ties
    with torch.no_grad():
        logits = lm.model.compute_logits(torch.randn(3, lm.config.hidden_size, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.ne(logits, logits.bfloat16().float()).any()
