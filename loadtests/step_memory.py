"""How much resident memory one engine step takes while it runs: rounds of prompts prefilled on the default model,
the heap trimmed before each step, RSS sampled every 3 ms on a second thread; prints each prefill step's size,
time and peak over its start. Compares CPU step budgets (a soak's single-sample RSS peaks miss a step's transient peak).

    python -m loadtests.step_memory --max-num-batched-tokens 2048
    python -m loadtests.step_memory --max-num-batched-tokens 1024
"""
from __future__ import annotations

import argparse
import os
import random
import threading
import time

from loadtests.native_memory import WORDS


def rss_mib() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3, help="the first round warms up and is not printed")
    p.add_argument("--prompts", type=int, default=8)
    args = p.parse_args(argv)
    from loom_kernels.cpu.platform import trim_heap
    from server.cli import bound_native_caches
    bound_native_caches()
    from server.engine import EngineCore, EngineSettings, SamplingParams
    from server.model import ModelSettings, load_model

    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    lm = load_model(ModelSettings(model="default"))
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.5, max_num_batched_tokens=args.max_num_batched_tokens))
    rng = random.Random(0)
    for r in range(args.rounds):
        for i in range(args.prompts):
            ids = lm.tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(250, 700))))
            core.add_request(f"r{r}-{i}", ids, SamplingParams(max_tokens=8, temperature=0.8, seed=i))
        while core.has_unfinished():
            trim_heap()
            start = peak[0] = rss_mib()
            began = time.perf_counter()
            core.step()
            took = time.perf_counter() - began
            time.sleep(0.01)  # the sampler's last look
            if r and core.last_step_tokens > 64:
                print(f"round {r}: {core.last_step_tokens} tokens in {took * 1e3:.0f} ms, RSS {start} MiB at the "
                      f"start, peak +{peak[0] - start} MiB", flush=True)


if __name__ == "__main__":
    main()
