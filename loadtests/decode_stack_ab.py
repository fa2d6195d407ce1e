"""The one-call C++ decode stack against the Python layer loop on the same loaded model: output tokens/s of one
greedy request (prompt cached after the warm-up, so the figure is decode steps), interleaved rounds, and whether the
two give the same tokens.

    python -m loadtests.decode_stack_ab --model default
    python -m loadtests.decode_stack_ab --random gemma3-270m --quantization q8

`--random` builds a checkpoint of random weights from a transformers config of that shape (vocabulary cut to 32k
to keep the head from dominating) under ~/.cache/loom-bench once; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import torch

from loom_kernels.cpu.platform import cpu_model
from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import ModelSettings, load_model

SHAPES = {
    "gemma3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(vocab_size=32768, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                         max_position_embeddings=4096, query_pre_attn_scalar=256)),
}


def random_checkpoint(shape: str) -> Path:
    out = Path("~/.cache/loom-bench").expanduser() / f"random-{shape}"
    if not (out / "config.json").exists():
        import transformers
        config_cls, model_cls, kwargs = SHAPES[shape]
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).to(torch.bfloat16)
        model.save_pretrained(out)
    return out


def tokens_per_s(lm, prompt: list[int], tokens: int, stack: bool) -> tuple[float, list[int]]:
    """One request on a fresh engine, the stack allowed or not."""
    off = mock.patch("server.model.llama.wants_stack", return_value=False)
    with contextlib.nullcontext() if stack else off:
        core = EngineCore(lm, EngineSettings(kv_cache_memory=0.2, speculative="none"))
        generate(core, [prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # prompt cached
        started = time.perf_counter()
        out = generate(core, [prompt], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        elapsed = time.perf_counter() - started
    if (lm.model.decode_stacks is not None) != stack:
        raise RuntimeError("the decode stack was not taken as asked (no compiler, or a float32 dense model)")
    return tokens / elapsed, out[0][0].token_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--random", choices=sorted(SHAPES), help="a random-weight checkpoint of this shape instead")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = str(random_checkpoint(args.random)) if args.random else args.model
    lm = load_model(ModelSettings(model=model, quantization=args.quantization), progress=False)
    prompt = [(7 * i + 3) % 30000 + 2 for i in range(32)]
    rates: dict[str, list[float]] = {"stack": [], "python": []}
    texts = {}
    for _ in range(args.rounds):
        for name in rates:
            rate, texts[name] = tokens_per_s(lm, prompt, args.tokens, name == "stack")
            rates[name].append(round(rate, 1))
    best = {name: max(v) for name, v in rates.items()}
    print(json.dumps({"cpu": cpu_model(), "model": model, "quantization": lm.quantization, "dtype": str(lm.dtype),
                      "tok_s": rates, "speedup_best": round(best["stack"] / best["python"], 2),
                      "same_tokens": texts["stack"] == texts["python"]}, indent=1))


if __name__ == "__main__":
    main()
