"""Soak test: N minutes of Poisson arrivals at a fixed rate against a running server, then leak checks.

    python -m loadtests.soak --base-url http://127.0.0.1:8000 --minutes 10 --rate 2
    python -m loadtests.soak --launch loom --minutes 5 --rate 1 --loom-args "--max-num-seqs 32"
    python -m loadtests.soak --base-url http://127.0.0.1:8000 --minutes 30 --rate 1 --workload mixed

`--workload mixed` (loadtests/mixed.py) sends a fixed mix of chat streams, non-streamed completions, classifications,
clients that disconnect mid-stream and requests whose `timeout` expires; requests are reported by status, and 429/504
are expected outcomes, counted apart from errors.

Checks (exit status 1 when one fails):
1. Memory stays flat. The server's RSS (/proc/PID/status VmRSS; PID from --pid, --launch, or the process listening
   on the URL's port) is sampled every --sample-s seconds. Samples from the first --warmup-fraction of the run are
   dropped (allocator pools, caches and lazily built kernels fill up there); of the rest, the median of the last
   quarter must be at most (1 + --rss-tolerance) x the median of the first quarter (default 10%). Shrinking passes.
2. Every KV block came back. After the last request and up to --settle-s seconds, /metrics must show no running
   or waiting requests and a KV-cache usage of 0 (`loom_kv_cache_usage_ratio`, or `loom_kv_cache_usage`), and,
   where the server exports both, free blocks == all blocks (cached prefixes count as free).
3. No request failed (--max-error-rate to allow some); with the mixed load, 429 and 504 do not count as failures.
4. With --rss-mark-minutes M (and a run longer than 2 M): every RSS sample of the last M minutes is within
   --rss-mark-tolerance (5%) of the RSS at the M-minute mark (median of the samples within 30 s of it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from loadtests.client import Target, fetch_model_id, run
from loadtests.dataset import PromptMaker, build_workload, load_tokenizer
from loadtests.metrics import format_report, summarize

KV_USAGE = ("loom_kv_cache_usage_ratio", "loom_kv_cache_usage")
RUNNING = ("loom_num_requests_running", "loom_running_requests")
WAITING = ("loom_num_requests_waiting", "loom_waiting_requests")
BLOCKS = ("loom_kv_cache_blocks",)
FREE_BLOCKS = ("loom_kv_cache_free_blocks",)


# -- process memory --------------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_listening_on(port: int) -> int | None:
    """The pid of the process with a listening TCP socket on `port` (Linux /proc; None if not found/allowed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f[9])
    if not inodes:
        return None
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in (d / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(d.name)
        except OSError:
            continue
    return None


def rss_flat(samples: list[tuple[float, int]], warmup_fraction: float = 0.1, tolerance: float = 0.10) -> dict:
    """The memory criterion (see the module doc). `samples`: (seconds since start, bytes)."""
    if not samples:
        return {"ok": None, "reason": "no RSS samples (pid unknown?)"}
    end = samples[-1][0]
    kept = [s for s in samples if s[0] >= warmup_fraction * end]
    if len(kept) < 8:
        return {"ok": None, "reason": f"too few samples after warm-up ({len(kept)}); run longer or sample faster"}
    q = len(kept) // 4
    first = statistics.median(v for _, v in kept[:q])
    last = statistics.median(v for _, v in kept[-q:])
    growth = last / first - 1
    return {"ok": growth <= tolerance, "first_quarter_median_mib": first / 2 ** 20,
            "last_quarter_median_mib": last / 2 ** 20, "growth": growth, "tolerance": tolerance,
            "samples": len(samples), "samples_after_warmup": len(kept),
            "min_mib": min(v for _, v in samples) / 2 ** 20, "max_mib": max(v for _, v in samples) / 2 ** 20}


def rss_mark(samples: list[tuple[float, int]], mark_s: float, window_s: float, tolerance: float) -> dict:
    """RSS at `mark_s` (median of the samples within 30 s of it) and at the end; the last `window_s` seconds'
    samples must stay within `tolerance` of the mark."""
    if not samples or samples[-1][0] < mark_s + window_s:
        return {"ok": None, "reason": f"run shorter than the mark + window ({(mark_s + window_s) / 60:g} min)"}
    end = samples[-1][0]
    at_mark = statistics.median(v for t, v in samples if abs(t - mark_s) <= 30)
    at_end = statistics.median(v for t, v in samples if t >= end - 30)
    window = [v for t, v in samples if t >= end - window_s]
    hi, lo = max(window), min(window)
    return {"ok": hi <= at_mark * (1 + tolerance) and lo >= at_mark * (1 - tolerance),
            "mark_min": mark_s / 60, "rss_at_mark_mib": at_mark / 2 ** 20, "rss_at_end_mib": at_end / 2 ** 20,
            "window_min": window_s / 60, "window_max_mib": hi / 2 ** 20, "window_min_mib": lo / 2 ** 20,
            "window_max_vs_mark": hi / at_mark - 1, "tolerance": tolerance}


async def sample_rss(pid: int, every: float, out: list, stop: asyncio.Event, t0: float) -> None:
    while not stop.is_set():
        v = rss_bytes(pid)
        if v is not None:
            out.append((time.perf_counter() - t0, v))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


# -- /metrics ----------------------------------------------------------------------------------------------------------
def parse_prometheus(text: str) -> dict[str, float]:
    """Unlabelled samples (and the sum over labels) by metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            val = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + val if m.group(2) else val
    return out


def pick(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in metrics:
            return metrics[n]
    return None


def kv_check(metrics: dict[str, float]) -> dict:
    kv, running, waiting = pick(metrics, KV_USAGE), pick(metrics, RUNNING), pick(metrics, WAITING)
    blocks, free = pick(metrics, BLOCKS), pick(metrics, FREE_BLOCKS)
    problems = []
    if kv is None:
        problems.append(f"no KV usage gauge ({' / '.join(KV_USAGE)}) in /metrics")
    elif kv != 0:
        problems.append(f"KV cache usage {kv} after the run (expected 0)")
    if running is None:
        problems.append(f"no running-requests gauge ({' / '.join(RUNNING)}) in /metrics")
    elif running != 0:
        problems.append(f"{running:g} requests still running")
    if waiting:
        problems.append(f"{waiting:g} requests still waiting")
    if blocks is not None and free is not None and free != blocks:
        problems.append(f"{blocks - free:g} of {blocks:g} KV blocks not free")
    return {"ok": not problems, "problems": problems, "kv_cache_usage": kv, "running": running, "waiting": waiting,
            "blocks": blocks, "free_blocks": free}


async def settle_and_check(base_url: str, settle_s: float, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + settle_s
    result = {"ok": False, "problems": ["/metrics never answered"]}
    async with httpx.AsyncClient(timeout=10) as c:
        while True:
            try:
                r = await c.get(base_url.rstrip("/") + "/metrics", headers=headers)
                if r.status_code == 200:
                    result = kv_check(parse_prometheus(r.text))
                else:
                    result = {"ok": False, "problems": [f"/metrics answered {r.status_code}"]}
            except httpx.HTTPError as exc:
                result = {"ok": False, "problems": [f"/metrics: {type(exc).__name__}: {exc}"]}
            if result["ok"] or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(0.5)


# -- main ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None)
    p.add_argument("--launch", default=None, help="start this registered server (e.g. loom) for the soak")
    p.add_argument("--loom-args", default="")
    p.add_argument("--pid", type=int, default=None, help="server pid for RSS (default: found from the port)")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--rate", type=float, required=True, help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=256, help="cap on requests in flight")
    p.add_argument("--workload", default="random", choices=["random", "shared-prefix", "tasks", "mixed"])
    p.add_argument("--mix", default=None, help="mixed workload weights, e.g. chat=4,completion=2,classify=1.5,"
                                               "disconnect=1.5,deadline=1 (the default)")
    p.add_argument("--deadline-s", type=float, default=0.5, help="mixed: the `timeout` of deadline requests")
    p.add_argument("--rss-mark-minutes", type=float, default=None,
                   help="check the last this-many minutes against the RSS at this mark (see check 4)")
    p.add_argument("--rss-mark-tolerance", type=float, default=0.05)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.5, help="vary lengths so blocks churn")
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--settle-s", type=float, default=30.0, help="how long the server may take to go idle")
    p.add_argument("--max-error-rate", type=float, default=0.0)
    p.add_argument("--no-kv-check", action="store_true", help="for servers without Loom's /metrics")
    p.add_argument("--out", default=None, help="JSON report (RSS samples included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


async def soak(args, base_url: str, pid: int | None, model: str | None, extra_body: dict | None = None) -> dict:
    n = max(1, math.ceil(args.rate * args.minutes * 60))
    maker = PromptMaker(load_tokenizer(args.tokenizer), args.seed)
    send = None
    if args.workload == "mixed":
        from loadtests.mixed import mixed_workload, parse_mix, send_mixed
        specs = mixed_workload(maker, n, args.input_len, args.output_len, args.range_ratio, args.seed,
                               parse_mix(args.mix), args.deadline_s)
        send = send_mixed
    else:
        specs = build_workload(args.workload, maker, n, args.input_len, args.output_len, args.range_ratio,
                               args.prefix_len, seed=args.seed)
    target = Target(base_url, model, dict(extra_body if extra_body is not None else {"ignore_eos": True}),
                    args.api_key)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample_rss(pid, args.sample_s, samples, stop, t0)) if pid else None
    try:
        results, duration = await run(target, specs, args.max_concurrency, args.rate, seed=args.seed,
                                      progress=not args.no_progress, desc=f"soak {args.rate:g} req/s", send=send)
    finally:
        stop.set()
        if sampler:
            await sampler
    summary = summarize(results, duration)
    kv = {"ok": None, "problems": ["skipped (--no-kv-check)"]} if args.no_kv_check else \
        await settle_and_check(base_url, args.settle_s, args.api_key)
    mem = rss_flat(samples, args.warmup_fraction, args.rss_tolerance) if pid else \
        {"ok": None, "reason": "server pid unknown (give --pid)"}
    statuses = None
    if send is not None:
        from loadtests.mixed import by_status
        statuses = by_status(results)
        bad = statuses["unexpected"] + statuses["unexpected_504"]
        errors = {"ok": bad / max(1, len(results)) <= args.max_error_rate, "error_rate": bad / max(1, len(results)),
                  "errors": statuses["errors"]}
    else:
        error_rate = summary["failed"] / max(1, summary["num_requests"])
        errors = {"ok": error_rate <= args.max_error_rate, "error_rate": error_rate, "errors": summary["errors"]}
    checks = {"memory_flat": mem, "kv_blocks_returned": kv, "errors": errors}
    if args.rss_mark_minutes:
        m = args.rss_mark_minutes * 60
        checks["rss_after_mark"] = rss_mark(samples, m, m, args.rss_mark_tolerance) if pid else \
            {"ok": None, "reason": "server pid unknown (give --pid)"}
    return {"base_url": base_url, "pid": pid, "minutes": args.minutes, "rate": args.rate, "requests": n,
            "summary": summary, "checks": checks, "statuses": statuses,
            "ok": all(c.get("ok") is not False for c in checks.values()),
            "rss_samples": [(round(t, 2), v) for t, v in samples]}


def _print(report: dict) -> None:
    print(format_report(f"soak {report['minutes']:g} min at {report['rate']:g} req/s", report["summary"]))
    mem = report["checks"]["memory_flat"]
    if mem.get("ok") is None:
        print(f"memory: not checked: {mem.get('reason')}")
    else:
        print(f"memory: {'OK' if mem['ok'] else 'GREW'}: RSS median {mem['first_quarter_median_mib']:.1f} MiB (first "
              f"quarter after warm-up) -> {mem['last_quarter_median_mib']:.1f} MiB (last quarter), "
              f"{mem['growth']:+.1%} (limit +{mem['tolerance']:.0%}); range {mem['min_mib']:.1f}-{mem['max_mib']:.1f} "
              f"MiB over {mem['samples']} samples")
    mark = report["checks"].get("rss_after_mark")
    if mark and mark.get("ok") is None:
        print(f"RSS mark: not checked: {mark.get('reason')}")
    elif mark:
        print(f"RSS mark: {'OK' if mark['ok'] else 'MOVED'}: {mark['rss_at_mark_mib']:.1f} MiB at "
              f"{mark['mark_min']:g} min, {mark['rss_at_end_mib']:.1f} MiB at the end; last {mark['window_min']:g} "
              f"min {mark['window_min_mib']:.1f}-{mark['window_max_mib']:.1f} MiB "
              f"({mark['window_max_vs_mark']:+.1%} max vs the mark, limit {mark['tolerance']:.0%})")
    if report.get("statuses"):
        st = report["statuses"]
        print(f"requests by status: {st['by_status']}")
        print(f"by scenario: {st['by_scenario']}")
        print(f"unexpected: {st['unexpected']} (+ {st['unexpected_504']} 504s outside deadline requests); "
              f"deadline requests that finished: {st['deadline_finished']}")
    kv = report["checks"]["kv_blocks_returned"]
    print("kv blocks: " + ("not checked" if kv.get("ok") is None else "OK: all returned, nothing running"
                           if kv["ok"] else "LEAK: " + "; ".join(kv["problems"])))
    e = report["checks"]["errors"]
    print(f"errors: {'OK' if e['ok'] else 'FAIL'}: {e['error_rate']:.1%} {e['errors'] or ''}")
    print("SOAK " + ("PASSED" if report["ok"] else "FAILED"), flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.launch:
        from loadtests.peers import REPO, SERVERS, ServerContext, default_model_files, free_port, start_server
        gguf, hf_dir = default_model_files()
        ctx = ServerContext(port=free_port(), max_concurrency=min(args.max_concurrency, 64),
                            ctx_per_seq=max(1024, args.prefix_len + 2 * (args.input_len + args.output_len)),
                            loom_args=args.loom_args.split(), gguf=gguf, hf_dir=hf_dir)
        with start_server(args.launch, ctx, REPO / "loadtests/results/logs") as srv:
            report = asyncio.run(soak(args, srv.base_url, args.pid or srv.pid, args.model or srv.model_id,
                                      SERVERS[args.launch].extra_body))
    else:
        if not args.base_url:
            raise SystemExit("give --base-url (of a running server) or --launch")
        pid = args.pid or pid_listening_on(urlparse(args.base_url).port or 80)
        model = args.model or asyncio.run(fetch_model_id(args.base_url, args.api_key))
        report = asyncio.run(soak(args, args.base_url, pid, model))
    _print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if not report["ok"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
