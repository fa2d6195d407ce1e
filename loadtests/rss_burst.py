"""Server memory under bursts of long prompts: RSS when idle, then after each of `--rounds` bursts (each `--burst`
concurrent completions of `--prompt-tokens` tokens, plus short ones beside them), after the server went idle again.
With a bounded server RSS levels off after the first burst or two; a leak or unbounded temporaries keep it rising.

    python -m loadtests.rss_burst --base-url http://127.0.0.1:8000 --rounds 4 --burst 8 --prompt-tokens 3000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from loadtests.dataset import PromptMaker, load_tokenizer
from loadtests.soak import pid_listening_on, rss_bytes, settle_and_check


async def burst(base_url: str, prompts: list[str], max_tokens: int) -> list[int]:
    async with httpx.AsyncClient(timeout=1800) as c:
        async def one(p: str) -> int:
            r = await c.post(base_url + "/v1/completions", json={"prompt": p, "max_tokens": max_tokens,
                                                                 "ignore_eos": True, "temperature": 0})
            return r.status_code
        return await asyncio.gather(*(one(p) for p in prompts))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtests.rss_burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--pid", type=int, default=None)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--burst", type=int, default=8, help="long prompts per burst")
    p.add_argument("--short", type=int, default=8, help="short prompts sent beside them")
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--idle-s", type=float, default=3.0, help="wait after each burst before reading RSS")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pid = args.pid or pid_listening_on(urlparse(args.base_url).port or 80)
    maker = PromptMaker(load_tokenizer(args.tokenizer), 0)
    rng = random.Random(0)
    report = {"pid": pid, "rss_mib": {"idle_start": rss_bytes(pid) / 2 ** 20}, "statuses": [], "seconds": []}
    print(f"idle: {report['rss_mib']['idle_start']:.0f} MiB", flush=True)
    for i in range(args.rounds):  # fresh prompts each round (prefix caching would otherwise skip the prefill)
        prompts = [maker.text(args.prompt_tokens, rng) for _ in range(args.burst)]
        prompts += [maker.text(32, rng) for _ in range(args.short)]
        t0 = time.perf_counter()
        statuses = asyncio.run(burst(args.base_url, prompts, args.max_tokens))
        took = time.perf_counter() - t0
        time.sleep(args.idle_s)
        rss = rss_bytes(pid) / 2 ** 20
        report["rss_mib"][f"after_burst_{i + 1}"] = rss
        report["statuses"].append(statuses)
        report["seconds"].append(took)
        print(f"burst {i + 1}: {took:.1f} s, statuses {sorted(set(statuses))}, RSS {rss:.0f} MiB", flush=True)
    report["kv"] = asyncio.run(settle_and_check(args.base_url, 30))
    print(f"kv blocks back: {report['kv']['ok']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
