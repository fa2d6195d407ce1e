"""Batch-1 greedy decoding: Loom's engine against Hugging Face `generate` on the same weights, same dtype, same
prompt, measured in one run; plus model load time (cached conversion) and resident memory.

    python -m loadtests.single_stream --dtype bfloat16 --tokens 128
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import ModelSettings, load_model
from server.model.loader import hf_reference_directory


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    out: dict = {"model": args.model, "dtype": args.dtype, "tokens": args.tokens, "threads": torch.get_num_threads()}

    started = time.perf_counter()
    lm = load_model(ModelSettings(model=args.model, dtype=args.dtype), progress=False)
    out["loom_load_s"] = round(time.perf_counter() - started, 2)
    out["loom_peak_rss_mib_after_load"] = round(rss_mib())
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.5))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    generate(core, [prompt], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    best = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        generate(core, [prompt], params)
        best = min(best or 1e9, time.perf_counter() - t)
    out["loom_tok_s"] = round(args.tokens / best, 1)

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_reference_directory(args.model, ModelSettings().cache_dir),
                                              dtype=getattr(torch, args.dtype)).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            hf.generate(ids, **kwargs)
            best = min(best or 1e9, time.perf_counter() - t)
    out["hf_generate_tok_s"] = round(args.tokens / best, 1)
    out["ratio"] = round(out["loom_tok_s"] / out["hf_generate_tok_s"], 2)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
