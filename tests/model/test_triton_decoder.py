"""The whole decoder through the Triton kernels (interpreter on CPU) gives the PyTorch path's greedy tokens.

The interpreter is slow, so this runs a tiny random Llama (2 layers) and a GPT-2 for a few steps, batched with
mixed prompt lengths so prefill, chunked prefill and decode kernels all run."""
import importlib
import os

import pytest
import torch

from server.model import ModelSettings, load_model
from tests.support.models import loom_greedy, random_prompts


@pytest.mark.parametrize("model", ["dummy:tiny", "gpt2"])
def test_greedy_tokens_match_reference_path(model, tiny_checkpoints, monkeypatch, kernel_env):
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py
    kernel_env("triton")
    spec = model if model.startswith("dummy:") else str(tiny_checkpoints[model])
    lm = load_model(ModelSettings(model=spec, dtype="float32"), progress=False)
    prompts = random_prompts(3, 5, 40, seed=3)
    kwargs = dict(block_size=16, max_num_batched_tokens=32)  # the longest prompt takes two chunks
    calls = {"decode": 0, "prefill": 0}
    for kind in calls:
        module = importlib.import_module(f"loom_kernels.attention.{kind}_triton")
        original = getattr(module, f"paged_attention_{kind}_triton")

        def counting(*args, _kind=kind, _original=original, **kw):
            calls[_kind] += 1
            return _original(*args, **kw)
        monkeypatch.setattr(module, f"paged_attention_{kind}_triton", counting)
    via_triton = loom_greedy(lm, prompts, 6, **kwargs)
    assert calls["decode"] > 0 and calls["prefill"] > 0, "the Triton kernels did not run"
    kernel_env("torch")
    calls.update(decode=0, prefill=0)
    via_torch = loom_greedy(lm, prompts, 6, **kwargs)
    assert calls == {"decode": 0, "prefill": 0}, "the reference path ran Triton kernels"
    assert via_triton == via_torch
