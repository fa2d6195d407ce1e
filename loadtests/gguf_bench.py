"""One GGUF file, Loom beside llama-server: first start and restart to ready, peak resident memory, bytes Loom
writes to its cache, and output tokens/s at a few concurrencies (random prompts, fresh ones per level, exact
lengths, ignore_eos).

    python -m loadtests.gguf_bench --gguf ~/.cache/loom-bench/llama-1b-Q4_K_M.gguf --concurrency 1,8

Both get the same KV-cache memory: llama-server's context (slots x --ctx-per-seq tokens of f16 K and V) is sized
first and Loom's `--kv-cache-memory` is set to the same bytes. Peak RSS is the process's VmHWM, read just before it
is stopped. Results: loadtests/results/gguf_bench-<file>.json (git-ignored) and a Markdown row on stdout."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from loadtests import serve
from loadtests.peers import REPO, SERVERS, ServerContext, free_port, start_server


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kv_bytes(gguf: Path, tokens: int) -> int:
    """llama-server's f16 K and V for `tokens` positions of this model."""
    from server.model.weights.gguf import hf_config
    from server.model.weights.gguf_file import read_header
    cfg = hf_config(read_header(gguf))
    return tokens * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 2


def throughput(base_url: str, args, label: str) -> tuple[dict[int, float], dict[int, dict]]:
    """Output tokens/s per concurrency, and the median TTFT (mostly the prompt's prefill) and TPOT (a decode step).
    Each level draws its own prompts (seed = its place in the list; the same for both servers), so no level finds
    the previous level's prompts in a prefix cache."""
    tok_s, latency = {}, {}
    for seed, level in enumerate(args.concurrency.split(",")):
        doc = serve.main(["--base-url", base_url, "--concurrency", level, "--num-requests", str(args.num_requests),
                          "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--seed",
                          str(seed), "--label", label, "--quiet", "--no-progress"])
        (lv,) = doc["levels"]
        tok_s[lv["concurrency"]] = round(lv["output_throughput"], 2)
        latency[lv["concurrency"]] = {"median_ttft_ms": round(lv["median_ttft_ms"]),
                                      "median_tpot_ms": round(lv["median_tpot_ms"], 1)}
    return tok_s, latency


def run_one(name: str, ctx: ServerContext, args, label: str, measure: bool) -> dict:
    with start_server(name, ctx, REPO / "loadtests/results/logs") as srv:
        out = {"ready_s": round(srv.startup_s, 1)}
        if measure:
            out["output_tok_s"], out["latency"] = throughput(srv.base_url, args, label)
        out["peak_rss_mb"] = round(peak_rss_mb(srv.pid))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    p.add_argument("--loom-args", default="")
    args = p.parse_args()
    gguf = args.gguf.expanduser().resolve()
    slots = max(int(c) for c in args.concurrency.split(","))
    kv_gib = kv_bytes(gguf, slots * args.ctx_per_seq) / 2 ** 30
    cache = Path(tempfile.mkdtemp(prefix="loom-bench-cache-"))
    loom_args = ["--model", str(gguf), "--cache-dir", str(cache), "--kv-cache-memory", f"{kv_gib:.3f}",
                 "--max-num-seqs", str(slots), *args.loom_args.split()]
    ctx = ServerContext(port=free_port(), max_concurrency=slots, ctx_per_seq=args.ctx_per_seq, gguf=gguf,
                        loom_args=loom_args)
    result = {"gguf": str(gguf), "file_mb": round(gguf.stat().st_size / 1e6), "kv_cache_gib": round(kv_gib, 3),
              "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"gguf": str(gguf)}}
    try:
        result["loom_first"] = run_one("loom", ctx, args, "loom", measure=False)
        result["loom_cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6, 1)
        result["loom"] = run_one("loom", ctx, args, "loom", measure=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result["llama_server"] = run_one("llama-server", ctx, args, "llama-server", measure=True)
    result["llama_server_version"] = SERVERS["llama-server"].version()
    out = REPO / "loadtests/results" / f"gguf_bench-{gguf.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    loom, peer = result["loom"], result["llama_server"]
    ratios = " / ".join(f"c={c}: {loom['output_tok_s'][c]} vs {peer['output_tok_s'][c]} = "
                        f"{loom['output_tok_s'][c] / peer['output_tok_s'][c]:.2f}x" for c in loom["output_tok_s"])
    print(f"| {gguf.name} | first {result['loom_first']['ready_s']} s, restart {loom['ready_s']} s vs "
          f"{peer['ready_s']} s | RSS {loom['peak_rss_mb']} vs {peer['peak_rss_mb']} MB | cache "
          f"{result['loom_cache_mb']} MB | {ratios} |")


if __name__ == "__main__":
    main()
