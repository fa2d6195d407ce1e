"""Latency of one zero-shot /v1/classify at a time (sequential calls, each text made distinct so the prefix cache
cannot serve it): the first call also computes the labels' calibration, the median of the rest is the figure.

    python -m loadtests.classify_latency --base-url http://127.0.0.1:8000 --calls 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

TEXT = ("The central bank raised interest rates by half a point on Tuesday, citing persistent inflation in housing "
        "and services, while the finance minister warned parliament that the budget deficit would widen. ") * 6
LABELS = ["economy", "sports", "cooking", "politics"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--calls", type=int, default=6)
    args = p.parse_args(argv)
    seconds, last = [], None
    for i in range(args.calls):
        started = time.perf_counter()
        r = httpx.post(f"{args.base_url}/v1/classify", json={"input": f"Report {i}: {TEXT}", "labels": LABELS},
                       timeout=600)
        seconds.append(time.perf_counter() - started)
        r.raise_for_status()
        last = r.json()
    report = {"first_s": round(seconds[0], 2), "median_s": round(statistics.median(seconds[1:] or seconds), 2),
              "prompt_tokens": last["usage"]["prompt_tokens"],
              "scores": {k: round(v, 3) for k, v in last["data"][0]["scores"].items()}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
