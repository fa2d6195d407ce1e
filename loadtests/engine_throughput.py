"""Engine-level throughput (no HTTP): aggregate output tokens/s for N concurrent requests against the same requests
run one at a time, and the prefix-cache speed-up on a shared-prefix workload.

    python -m loadtests.engine_throughput --model default --concurrency 1 8 32 64
"""
from __future__ import annotations

import argparse
import json
import random
import time

from tqdm import tqdm

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import ModelSettings, load_model


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(length)]


def run_batch(core: EngineCore, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    results = generate(core, prompts, params)
    return time.perf_counter() - started, sum(len(r[0].token_ids) for r in results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--sequential-requests", type=int, default=2, help="requests in the one-at-a-time baseline")
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    lm = load_model(ModelSettings(model=args.model, dtype=args.dtype))
    vocab = lm.config.vocab_size
    rng = random.Random(0)
    core = EngineCore(lm, EngineSettings(enable_prefix_caching=False))
    run_batch(core, [random_prompt(rng, args.prompt_len, vocab)], 8)  # warm-up
    results: dict = {"model": args.model, "dtype": str(lm.dtype), "prompt_len": args.prompt_len,
                     "output_len": args.output_len}

    seconds = tokens = 0
    for _ in tqdm(range(args.sequential_requests), desc="one at a time"):
        s, t = run_batch(core, [random_prompt(rng, args.prompt_len, vocab)], args.output_len)
        seconds, tokens = seconds + s, tokens + t
    baseline = tokens / seconds
    results["one_at_a_time_tok_s"] = round(baseline, 1)
    print(f"one at a time: {baseline:.1f} output tok/s")
    results["concurrent"] = []
    for n in tqdm(args.concurrency, desc="concurrency"):
        s, t = run_batch(core, [random_prompt(rng, args.prompt_len, vocab) for _ in range(n)], args.output_len)
        row = {"concurrency": n, "output_tok_s": round(t / s, 1), "ratio_vs_one_at_a_time": round(t / s / baseline, 2),
               "seconds": round(s, 2)}
        results["concurrent"].append(row)
        print(f"concurrency {n:3d}: {t / s:8.1f} output tok/s  ({t / s / baseline:.2f}x one at a time)")

    prefix = random_prompt(rng, args.prefix_len, vocab)
    prompts = [prefix + random_prompt(rng, 32, vocab) for _ in range(args.prefix_requests)]
    timings = {}
    for caching in (False, True):
        c = EngineCore(lm, EngineSettings(enable_prefix_caching=caching, max_num_seqs=8))
        timings[caching], _ = run_batch(c, prompts, 16)
    results["prefix_cache"] = {"requests": args.prefix_requests, "prefix_len": args.prefix_len,
                               "seconds_off": round(timings[False], 2), "seconds_on": round(timings[True], 2),
                               "speedup": round(timings[False] / timings[True], 2)}
    print(f"shared {args.prefix_len}-token prefix, {args.prefix_requests} requests: {timings[False]:.2f}s without "
          f"prefix caching, {timings[True]:.2f}s with ({timings[False] / timings[True]:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
