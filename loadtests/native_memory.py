"""Where resident memory goes under a repeated mixed load, in-process (no HTTP): rounds of 3 zero-shot classifies,
4 sampled generations and 1 aborted stream on the default model, then a pause so the engine goes idle and trims its
heap. After each round: the round's time, RSS of every mapping over 50 MiB (`[heap]`, thread arenas and merged mmaps
show as `anon`), and the memory Python objects hold (tracemalloc). A mapping that keeps growing over identical
rounds while tracemalloc stays flat is native memory (a library cache, allocator fragmentation).

    python -m loadtests.native_memory --rounds 12
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 MALLOC_MMAP_THRESHOLD_=262144 python -m loadtests.native_memory --rounds 8
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import tracemalloc

WORDS = "the bank rate market team game cook soup vote party law court film song rain snow".split()


def mappings(min_kib: int = 50 * 1024) -> str:
    """'name:size/rss' in MiB for every mapping of at least `min_kib` in /proc/self/smaps."""
    out, name, size = [], "anon", 0
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "anon"
        elif parts[0] == "Size:":
            size = int(parts[1])
        elif parts[0] == "Rss:" and size >= min_kib:
            out.append(f"{name}:{size >> 10}/{int(parts[1]) >> 10}")
    return " ".join(out)


async def one_round(engine, classifier, tokenizer, seed: int) -> None:
    from server.engine import SamplingParams, collect
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    jobs = [classifier.classify([text(rng.randint(30, 300))], ["economy", "sports", "cooking", "politics"])
            for _ in range(3)]
    for i in range(4):
        params = SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.8, seed=i)
        jobs.append(collect(engine.generate(tokenizer.encode(text(rng.randint(20, 600))), params)))

    async def aborted() -> None:
        stream = engine.generate(tokenizer.encode(text(200)), SamplingParams(max_tokens=64))
        async for _ in stream:
            break
        await stream.aclose()

    jobs.append(aborted())
    await asyncio.gather(*jobs)


async def amain(args) -> None:
    import torch

    from server.engine import AsyncEngine, EngineCore, EngineSettings
    from server.model import ModelSettings, load_model
    from server.tasks import Classifier
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSettings(model="default"))
    engine = AsyncEngine(EngineCore(lm, EngineSettings(kv_cache_memory=0.5)))
    classifier = Classifier(engine.generate, lm.tokenizer, 2048)
    tracemalloc.start()
    try:
        for r in range(args.rounds):
            started = time.perf_counter()
            await one_round(engine, classifier, lm.tokenizer, 0 if args.same_texts else r)
            took = time.perf_counter() - started
            await asyncio.sleep(0.7)  # idle: the engine trims the heap
            gc.collect()
            print(f"round {r} {took:.2f} s | python {tracemalloc.get_traced_memory()[0] >> 20} MiB | {mappings()}",
                  flush=True)
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--same-texts", action="store_true",
                   help="every round the same texts (same shapes): growth that remains is not a per-shape cache")
    asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    main()
