"""Inter-token latency of running streams while a long prompt prefills, per prefill-chunk cap (no HTTP).

`--streams` requests decode; once they run, one `--long-prompt`-token prompt is submitted. We record every stream's
gaps between tokens while that prompt prefills, and how long a 4-token request submitted at the same moment waits
for its first token. A cap equal to the step budget is the old behaviour (one sequence takes the whole step).

    python -m loadtests.long_prompt_itl --model default --chunks 128 256 512 2048
"""
from __future__ import annotations

import argparse
import json
import random
import time

from server.engine import EngineCore, EngineSettings, SamplingParams
from server.model import ModelSettings, load_model


def measure(lm, chunk: int, streams: int, long_len: int, budget: int) -> dict:
    core = EngineCore(lm, EngineSettings(kv_cache_memory=1.0, max_num_batched_tokens=budget,
                                         max_prefill_chunk=chunk, enable_prefix_caching=False))
    rng = random.Random(0)
    decode = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        core.add_request(f"stream-{i}", [rng.randrange(100, 40000) for _ in range(32)], decode)
    last: dict[str, float] = {}
    while len(last) < streams:  # every stream has produced its first token
        for out in core.step().outputs:
            last[out.request_id] = time.perf_counter()
    core.add_request("long", [rng.randrange(100, 40000) for _ in range(long_len)],
                     SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    submitted = time.perf_counter()
    core.add_request("short", [101, 102, 103, 104], SamplingParams(max_tokens=1, temperature=0.0))
    gaps, short_ttft, long_ttft = [], None, None
    while long_ttft is None:
        for out in core.step().outputs:
            now = time.perf_counter()
            if out.request_id.startswith("stream-") and out.token_ids:
                gaps.append(now - last[out.request_id])
                last[out.request_id] = now
            elif out.request_id == "short" and short_ttft is None:
                short_ttft = now - submitted
            elif out.request_id == "long":
                long_ttft = now - submitted
    gaps.sort()
    return {"chunk": chunk, "itl_p50_ms": round(1000 * gaps[len(gaps) // 2], 1),
            "itl_p99_ms": round(1000 * gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 1),
            "itl_max_ms": round(1000 * gaps[-1], 1), "short_ttft_ms": round(1000 * short_ttft, 1),
            "long_ttft_s": round(long_ttft, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 2048])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--long-prompt", type=int, default=7000)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    args = p.parse_args(argv)
    lm = load_model(ModelSettings(model=args.model, dtype=args.dtype), progress=False)
    for chunk in args.chunks:
        print(json.dumps(measure(lm, chunk, args.streams, args.long_prompt, args.budget)), flush=True)


if __name__ == "__main__":
    main()
