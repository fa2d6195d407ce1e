"""The one-call C++ decode step inside the model (server/model/weights/cpu_stack.py): taken where it applies, the same
next tokens as the Python layer loop on identical histories, every KV block back through the engine."""
import pytest
import torch

from loom_kernels.fused_cpu.decode_stack import decode_stack_available
from server.engine import EngineCore, EngineSettings
from server.model import FlatBatch, KVCache, ModelSettings, load_model
from tests.support.models import loom_greedy, random_prompts

pytestmark = pytest.mark.skipif(not decode_stack_available(), reason="no C++ compiler for the CPU kernels")


def load(path, dtype, quantization):
    return load_model(ModelSettings(model=str(path), dtype=dtype, quantization=quantization,
                                    kernel_calibration=False), progress=False)


@pytest.mark.parametrize("family,dtype,quantization", [("llama", "bfloat16", "q4"), ("qwen2", "bfloat16", "none"),
                                                       ("mistral", "float32", "q8")])
def test_stack_follows_the_python_loop_token_for_token(tiny_checkpoints, family, dtype, quantization):
    lm = load(tiny_checkpoints[family], dtype, quantization)
    model, cfg = lm.model, lm.config
    cache = KVCache.allocate(cfg.num_layers, 16, 16, cfg.num_kv_heads, cfg.head_dim, lm.dtype)
    assert model.enable_decode_stack(cache)
    stacks = model.decode_stacks
    for prompt in random_prompts(3, 5, 40, seed=1):
        table = list(range(8))
        with torch.inference_mode():
            model.decode_stacks = None
            nxt = int(model.compute_logits(model(FlatBatch.build([(prompt, 0, table)], [], 16), cache)[-1:]).argmax())
            for pos in range(len(prompt), len(prompt) + 24):
                batch = FlatBatch.build([], [(nxt, pos, table)], 16)
                model.decode_stacks = None
                want = model.compute_logits(model(batch, cache))
                model.decode_stacks = stacks
                got = model.compute_logits(model(batch, cache))
                assert int(got.argmax()) == int(want.argmax())
                torch.testing.assert_close(got.softmax(-1), want.softmax(-1), atol=0.02, rtol=0)
                nxt = int(want.argmax())


def test_float32_dense_keeps_the_python_loop(tiny_checkpoints):
    """Bit-identical to Hugging Face is the float32 contract: no C++ stack there."""
    lm = load(tiny_checkpoints["llama"], "float32", "none")
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.05))
    assert lm.model.decode_stacks is None and core.runner.kv_cache is not None


def test_engine_runs_the_stack_and_returns_every_block(tiny_checkpoints):
    lm = load(tiny_checkpoints["llama"], "bfloat16", "q4")
    prompts = random_prompts(6, 3, 30, seed=2)
    with_stack = loom_greedy(lm, prompts, 12)  # asserts every KV block came back
    assert lm.model.decode_stacks is not None and lm.model.decode_stacks.by_size  # the stack ran
    lm.model.enable_decode_stack = lambda cache: False  # the next engine keeps the Python loop
    lm.model.decode_stacks = None
    without = loom_greedy(lm, prompts, 12)
    same = sum(a == b for a, b in zip(with_stack, without))
    assert same >= len(prompts) - 1, (with_stack, without)  # bf16 near-ties may flip one free-running sequence


def test_loading_a_cpu_model_builds_every_cpu_kernel_up_front():
    """A kernel built on first use stalls the request that needs it (~25 s): loading builds or loads them all."""
    from loom_kernels.attention import cpu_decode
    from loom_kernels.fused_cpu import cpu_ops, decode_stack
    from loom_kernels.quant import blocks
    builds = [cpu_decode._compiled, cpu_ops._compiled, decode_stack._compiled, blocks._build]
    for build in builds:
        build.cache_clear()
    load_model(ModelSettings(model="dummy:tiny", kernel_calibration=False), progress=False)
    assert [build.cache_info().currsize for build in builds] == [1, 1, 1, 1]
