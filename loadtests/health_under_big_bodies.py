"""/health latency while huge request bodies arrive (issue 16, item 2): a liveness probe must stay fast whatever
other clients send.

    python -m loadtests.health_under_big_bodies --base-url http://127.0.0.1:8000

Polls /health every --interval-s while sending, concurrently, --completions completion bodies of --mb MB each and
one summarize body of --summarize-mb MB; prints /health p50/p99/max and each big request's status and time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def poll(client: httpx.AsyncClient, stop: asyncio.Event, interval: float, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await client.get("/health")
        out.append(time.perf_counter() - t)
        await asyncio.sleep(interval)


async def big(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, int, float]:
    t = time.perf_counter()
    try:
        r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        status = r.status_code
    except httpx.HTTPError as exc:
        status = -1
        print(f"{path}: {exc!r}")
    return path, status, time.perf_counter() - t


async def main(args: argparse.Namespace) -> dict:
    text = "The quick brown fox jumps over the lazy dog. " * int(args.mb * 2 ** 20 / 45)
    doc = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * int(args.summarize_mb * 2 ** 20 / 57)
    latencies: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=args.base_url, timeout=600) as client:
        await client.get("/health")
        poller = asyncio.create_task(poll(client, stop, args.interval_s, latencies))
        await asyncio.sleep(1.0)
        jobs = [big(client, "/v1/completions", {"prompt": text, "max_tokens": 4}) for _ in range(args.completions)]
        jobs.append(big(client, "/v1/summarize", {"text": doc}))
        results = await asyncio.gather(*jobs)
        await asyncio.sleep(1.0)
        stop.set()
        await poller
    ms = sorted(x * 1e3 for x in latencies)
    report = {"health_n": len(ms), "health_p50_ms": round(statistics.median(ms), 1),
              "health_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "health_max_ms": round(ms[-1], 1),
              "big_requests": [{"path": p, "status": s, "seconds": round(t, 2)} for p, s, t in results]}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--completions", type=int, default=2)
    p.add_argument("--mb", type=float, default=7.0)
    p.add_argument("--summarize-mb", type=float, default=8.0)
    p.add_argument("--interval-s", type=float, default=0.05)
    asyncio.run(main(p.parse_args()))
