"""Drive one OpenAI-compatible server (Loom or a peer) with a workload and report vLLM-style serving metrics.

    python -m loadtests.serve --base-url http://127.0.0.1:8000 --concurrency 1,4,16 --num-requests 32
    python -m loadtests.serve --launch llama-server --workload shared-prefix --request-rate 2 --num-requests 50
    python -m loadtests.serve --base-url http://127.0.0.1:8000 --workload tasks --concurrency 8

Workloads: `random` (fixed lengths, or sampled with --range-ratio), `shared-prefix` (--prefix-len shared system
prefix + --input-len distinct suffix), `tasks` (Loom's /v1/summarize + /v1/classify mix), or --dataset FILE.jsonl.
Prompts have an exact token length under the model's tokenizer; outputs are exactly --output-len tokens through
`max_tokens` + `ignore_eos` (Loom, llama-server, the HF peers; vLLM too). For a server that rejects unknown fields,
pass --no-ignore-eos (and --min-tokens where it knows `min_tokens`); short outputs are counted in the report.

Load: `--concurrency C` keeps at most C requests in flight (closed loop when the rate is infinite);
`--request-rate R` sends Poisson arrivals at R req/s (both combine, as in vLLM). A comma list in either one is a
sweep: one run per value, and with --plot a PNG of latency percentiles and throughput against load.
Output tokens come from the server's usage (`stream_options.include_usage`) when it reports it, else from
counting streamed chunks. Exit status 1 if any request failed and --fail-on-error is given.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from loadtests.client import Target, fetch_model_id, run
from loadtests.dataset import WORKLOADS, PromptMaker, RequestSpec, build_workload, load_jsonl, load_tokenizer
from loadtests.metrics import format_report, summarize


@dataclass
class Level:
    """One measured load level."""
    concurrency: int | None
    request_rate: float
    summary: dict
    requests: list[dict] = field(default_factory=list)

    def to_json(self, with_requests: bool = False) -> dict:
        d = {"concurrency": self.concurrency, "request_rate": _rate_json(self.request_rate), **self.summary}
        if with_requests:
            d["requests"] = self.requests
        return d


def _rate_json(rate: float):
    return "inf" if math.isinf(rate) else rate


def _parse_list(text: str, cast) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def _rate(x: str) -> float:
    return math.inf if x.strip().lower() in ("inf", "infinite", "0") else float(x)


async def measure(target: Target, specs: list[RequestSpec], concurrency: int | None, request_rate: float,
                  warmup: list[RequestSpec] = (), seed: int = 0, progress: bool = True, timeout: float = 600.0,
                  slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                  slo_e2e_ms: float | None = None, desc: str = "") -> Level:
    results, duration = await run(target, specs, concurrency, request_rate, seed=seed, warmup=warmup,
                                  progress=progress, timeout=timeout, desc=desc)
    s = summarize(results, duration, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms)
    return Level(concurrency, request_rate, s, [r.to_json() for r in results])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (or --launch)")
    s.add_argument("--launch", default=None, help="start this registered server for the run: loom, hf-static, "
                                                  "hf-continuous, llama-server (see loadtests/peers)")
    s.add_argument("--loom-args", default="", help="extra `loom serve` flags when --launch loom")
    s.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    s.add_argument("--api-key", default=None)
    s.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    s.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (OpenAI-strict servers)")
    s.add_argument("--min-tokens", action="store_true", help="also send min_tokens = max_tokens (vLLM-style)")
    s.add_argument("--extra-body", default=None, help="JSON merged into every generation request")
    s.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="random", choices=WORKLOADS)
    w.add_argument("--dataset", default=None, help="JSON lines {prompt, max_tokens?} instead of a synthetic workload")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens (suffix tokens for shared-prefix)")
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.0, help="sample lengths uniformly in len*[1-r, 1+r]")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens of the shared system prefix")
    w.add_argument("--summarize-fraction", type=float, default=0.5, help="tasks: share of /v1/summarize requests")
    w.add_argument("--tokenizer", default="default",
                   help="'default' (the default model's), 'words', or a tokenizer.json / HF directory")
    w.add_argument("--seed", type=int, default=0)
    load = p.add_argument_group("load")
    load.add_argument("--num-requests", type=int, default=64, help="requests per load level")
    load.add_argument("--concurrency", default=None, help="max requests in flight; a comma list sweeps")
    load.add_argument("--request-rate", default="inf", help="Poisson arrivals per second ('inf': all at once); "
                                                            "a comma list sweeps")
    load.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) before each level")
    slo = p.add_argument_group("goodput")
    slo.add_argument("--slo-ttft-ms", type=float, default=None)
    slo.add_argument("--slo-tpot-ms", type=float, default=None)
    slo.add_argument("--slo-e2e-ms", type=float, default=None)
    o = p.add_argument_group("output")
    o.add_argument("--label", default=None, help="name of this server in the report and plot")
    o.add_argument("--out", default=None, help="write results as JSON here")
    o.add_argument("--plot", default=None, help="write a PNG of the sweep here (needs matplotlib)")
    o.add_argument("--save-requests", action="store_true", help="include per-request measurements in the JSON")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no text report")
    o.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed")
    return p


def target_from_args(args, base_url: str, model: str | None, extra_body: dict | None = None) -> Target:
    extra = dict(extra_body if extra_body is not None else ({} if args.no_ignore_eos else {"ignore_eos": True}))
    if args.no_ignore_eos:
        extra.pop("ignore_eos", None)
    if args.extra_body:
        extra.update(json.loads(args.extra_body))
    return Target(base_url, model, extra, args.api_key, args.temperature, not args.no_usage)


def specs_from_args(args, maker: PromptMaker | None) -> list[RequestSpec]:
    if args.dataset:
        specs = load_jsonl(args.dataset, maker, args.output_len, args.endpoint)
    else:
        specs = build_workload(args.workload, maker, args.num_requests + args.warmup, args.input_len,
                               args.output_len, args.range_ratio, args.prefix_len, args.summarize_fraction,
                               args.seed, args.endpoint)
    if args.min_tokens:
        for s in specs:
            if s.kind in ("completion", "chat") and s.max_tokens:
                s.extra["min_tokens"] = s.max_tokens
    return specs


async def run_levels(args, target: Target, specs: list[RequestSpec], label: str) -> list[Level]:
    concs = _parse_list(args.concurrency, int) if args.concurrency else [None]
    rates = _parse_list(args.request_rate, _rate)
    if len(concs) > 1 and len(rates) > 1:
        raise SystemExit("sweep either --concurrency or --request-rate, not both")
    # synthetic workloads made `warmup` extra requests up front; a dataset warms up on its own first requests
    warm = specs[:args.warmup]
    body = specs if args.dataset else specs[args.warmup:]
    levels = []
    for c in concs:
        for r in rates:
            desc = f"{label} c={c or '-'} rate={'inf' if math.isinf(r) else r}"
            lvl = await measure(target, body, c, r, warmup=warm, seed=args.seed,
                                progress=not args.no_progress, timeout=args.timeout, slo_ttft_ms=args.slo_ttft_ms,
                                slo_tpot_ms=args.slo_tpot_ms, slo_e2e_ms=args.slo_e2e_ms, desc=desc)
            levels.append(lvl)
            if not args.quiet:
                print(format_report(desc, lvl.summary), flush=True)
                if lvl.summary.get("short_outputs"):
                    print(f"note: {lvl.summary['short_outputs']} requests stopped before max_tokens "
                          "(the server ignored ignore_eos?)", flush=True)
    return levels


def sweep_axis(levels: list[Level]) -> str:
    return "request_rate" if len({lv.request_rate for lv in levels}) > 1 else "concurrency"


def write_outputs(args, label: str, base_url: str, model: str | None, levels: list[Level], extra: dict) -> dict:
    doc = {
        "label": label, "base_url": base_url, "model": model, "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(["python -m loadtests.serve", *sys.argv[1:]]),
        "workload": {"name": "dataset" if args.dataset else args.workload, "input_len": args.input_len,
                     "output_len": args.output_len, "range_ratio": args.range_ratio, "prefix_len": args.prefix_len,
                     "endpoint": args.endpoint, "num_requests": args.num_requests, "seed": args.seed},
        **extra,
        "levels": [lv.to_json(args.save_requests) for lv in levels],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))
    if args.plot and len(levels) > 1:
        from loadtests.plot import plot_sweep
        axis = sweep_axis(levels)
        plot_sweep({label: [(lv.concurrency if axis == "concurrency" else lv.request_rate, lv.summary)
                            for lv in levels]}, args.plot, x_label=axis.replace("_", " "),
                   title=f"{label}: {doc['workload']['name']} {args.input_len}->{args.output_len} tokens")
    return doc


async def _amain(args) -> dict:
    maker = None
    if args.tokenizer != "none":
        maker = PromptMaker(load_tokenizer(args.tokenizer), args.seed)
    specs = specs_from_args(args, maker)
    if args.launch:
        from loadtests.peers import REPO, SERVERS, ServerContext, default_model_files, free_port, start_server
        gguf, hf_dir = default_model_files()
        concs = _parse_list(args.concurrency, int) if args.concurrency else [64]
        need = max(s.prompt_tokens + (s.max_tokens or 0) for s in specs) + 64
        ctx = ServerContext(port=free_port(), max_concurrency=max(max(concs), 1), ctx_per_seq=max(need, 1024),
                            loom_args=args.loom_args.split(), gguf=gguf, hf_dir=hf_dir)
        spec = SERVERS[args.launch]
        with start_server(args.launch, ctx, REPO / "loadtests/results/logs") as srv:
            label = args.label or args.launch
            target = target_from_args(args, srv.base_url, args.model or srv.model_id, spec.extra_body)
            levels = await run_levels(args, target, specs, label)
            return write_outputs(args, label, srv.base_url, target.model, levels,
                                 {"server": {"name": args.launch, "command": srv.command, "version": spec.version(),
                                             "startup_s": srv.startup_s}})
    if not args.base_url:
        raise SystemExit("give --base-url or --launch")
    model = args.model or await fetch_model_id(args.base_url, args.api_key)
    label = args.label or args.base_url
    target = target_from_args(args, args.base_url, model)
    levels = await run_levels(args, target, specs, label)
    return write_outputs(args, label, args.base_url, model, levels, {})


def main(argv: list[str] | None = None) -> dict:
    """Entry point of `python -m loadtests.serve`."""
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    doc = asyncio.run(_amain(args))
    if not args.quiet:
        print(f"done in {time.monotonic() - t0:.1f}s" + (f"; wrote {args.out}" if args.out else ""), flush=True)
    if args.fail_on_error and any(lv["failed"] for lv in doc["levels"]):
        sys.exit(1)
    return doc


if __name__ == "__main__":
    main()
