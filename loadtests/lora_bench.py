"""Adapters and many models, over HTTP on a `loom serve` of its own:

(a) output tokens/s at concurrency C of requests spread evenly over 4 LoRA adapters and the base model, against the
    same requests all on the base model (same server, same prompts, exact output lengths). The adapters are random
    PEFT ones written into a temporary directory: ranks 8 and 16, on q/k/v/o and gate/up/down. The mean engine step
    time of each phase comes from the server's `loom_step_duration_seconds`.
(b) the time to switch models in `--models-dir` with `--max-loaded-models 1`: a directory holding the model twice
    (two names for one file), requests alternating between the names (each forces an unload and a load) against
    requests repeating the loaded one.

    python -m loadtests.lora_bench --model default --concurrency 8 --num-requests 40 --output-len 64

Results: loadtests/results/lora_bench.json (or --json) and a summary on stdout."""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.client import Target, run
from loadtests.dataset import PromptMaker, RequestSpec, load_tokenizer, random_workload
from loadtests.metrics import summarize
from loadtests.peers import REPO, ServerContext, free_port, start_server

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def model_config(path: Path):
    from server.model.config import ModelConfig
    from server.model.weights.gguf import hf_config
    from server.model.weights.gguf_file import read_header

    return ModelConfig.from_dict(hf_config(read_header(path))) if path.is_file() else \
        ModelConfig.from_path(path / "config.json")


def write_adapter(cfg, out: Path, rank: int, seed: int) -> Path:
    """A random PEFT adapter (adapter_config.json + adapter_model.safetensors) for a model of `cfg`."""
    from safetensors.numpy import save_file

    q, kv, h, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f),
              "up_proj": (h, f), "down_proj": (f, h)}  # (in, out)
    rng, tensors = np.random.default_rng(seed), {}
    for layer in range(cfg.num_layers):
        for block, names in TARGETS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / fan_in ** 0.5) \
                    .astype(np.float32)
                tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False, "bias": "none",
        "target_modules": [n for names in TARGETS.values() for n in names]}))
    return out


def step_time(url: str) -> tuple[float, float]:
    """(sum, count) of the server's `loom_step_duration_seconds`."""
    text = httpx.get(url + "/metrics", timeout=10).text
    sums = [float(re.search(rf"^loom_step_duration_seconds_{k} (\S+)$", text, re.M).group(1)) for k in ("sum", "count")]
    return sums[0], sums[1]


def phase(url: str, specs: list[RequestSpec], concurrency: int, desc: str) -> dict:
    before = step_time(url)
    results, duration = asyncio.run(run(Target(url), specs, concurrency=concurrency, desc=desc))
    after = step_time(url)
    s = summarize(results, duration)
    steps = after[1] - before[1]
    row = {"requests": s["completed"], "failed": s["failed"], "output_tok_s": round(s["output_throughput"], 1),
           "median_ttft_ms": round(s["median_ttft_ms"], 1), "median_tpot_ms": round(s["median_tpot_ms"], 1),
           "steps": int(steps), "mean_step_ms": round(1000 * (after[0] - before[0]) / max(steps, 1), 2)}
    print(f"{desc:12s} {row}", flush=True)
    return row


def lora_phases(args, source: Path, tmp: Path) -> dict:
    cfg = model_config(source)
    names = [f"lora{i}" for i in range(4)]
    loras = [f"{n}={write_adapter(cfg, tmp / n, (8, 16)[i % 2], seed=i)}" for i, n in enumerate(names)]
    loom_args = ["--model", args.model, "--max-loras", "4", "--max-lora-rank", "16", "--max-num-seqs",
                 str(args.concurrency), "--kv-cache-memory", str(args.kv_gib), "--speculative", args.speculative,
                 *[a for lora in loras for a in ("--lora", lora)]]
    maker = PromptMaker(load_tokenizer("default"))
    specs = random_workload(maker, args.num_requests, args.input_len, args.output_len, seed=1)
    with start_server("loom", ServerContext(free_port(), loom_args=loom_args), REPO / "loadtests/results/logs") as srv:
        base = srv.model_id
        models = [base, *names]
        warm = [RequestSpec(s.kind, s.prompt, s.prompt_tokens, 8, {"model": m}) for s, m in zip(specs, models)]
        asyncio.run(run(Target(srv.base_url), warm, concurrency=len(warm), progress=False))
        only = [RequestSpec(s.kind, s.prompt, s.prompt_tokens, s.max_tokens, {"model": base}) for s in specs]
        mixed = [RequestSpec(s.kind, s.prompt, s.prompt_tokens, s.max_tokens, {"model": models[i % len(models)]})
                 for i, s in enumerate(specs)]
        base_row = phase(srv.base_url, only, args.concurrency, "base only")
        mixed_row = phase(srv.base_url, mixed, args.concurrency, "4 adapters+base")
    return {"base_model": base, "adapter_ranks": [(8, 16)[i % 2] for i in range(4)], "base_only": base_row,
            "mixed": mixed_row, "tok_s_ratio": round(mixed_row["output_tok_s"] / base_row["output_tok_s"], 3),
            "step_time_ratio": round(mixed_row["mean_step_ms"] / base_row["mean_step_ms"], 3)}


def timed_request(url: str, model: str, tokens: int) -> float:
    started = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello there", "max_tokens": tokens,
                                                  "temperature": 0, "ignore_eos": True}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - started


def switch_phase(args, source: Path, tmp: Path) -> dict:
    directory = tmp / "models"
    directory.mkdir()
    suffix = ".gguf" if source.is_file() else ""
    for name in ("first", "second"):
        (directory / f"{name}{suffix}").symlink_to(source)
    loom_args = ["--model", args.model, "--models-dir", str(directory), "--max-loaded-models", "1",
                 "--kv-cache-memory", str(args.kv_gib)]
    with start_server("loom", ServerContext(free_port(), loom_args=loom_args), REPO / "loadtests/results/logs") as srv:
        url, tokens = srv.base_url, args.output_len
        cold = timed_request(url, "first", tokens)
        stay, switch = [], []
        for i in range(args.switches):
            stay.append(timed_request(url, ("first", "second")[i % 2], tokens))  # its model is the loaded one
            switch.append(timed_request(url, ("second", "first")[i % 2], tokens))  # the other one is loaded
            print(f"switch {i + 1}/{args.switches}: stay {stay[-1]:.2f} s, switch {switch[-1]:.2f} s", flush=True)
        states = {m["id"]: m.get("state") for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}
    row = {"first_load_request_s": round(cold, 3), "stay_request_s": round(statistics.median(stay), 3),
           "switch_request_s": round(statistics.median(switch), 3), "switches": args.switches,
           "output_tokens": tokens, "states_after": states}
    row["switch_cost_s"] = round(row["switch_request_s"] - row["stay_request_s"], 3)
    print(f"models-dir   {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the base model: 'default', a GGUF or a HF directory")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--switches", type=int, default=3, help="model switches timed in --models-dir")
    p.add_argument("--kv-gib", type=float, default=1.0, help="--kv-cache-memory of the servers")
    # none by default: the adapters change what a draft accepts, so with speculation the two phases would run
    # different numbers of steps and their step times would not compare
    p.add_argument("--speculative", default="none", help="--speculative of the server (auto, ngram, none)")
    p.add_argument("--skip", choices=["lora", "models-dir"], default=None)
    p.add_argument("--json", type=Path, default=REPO / "loadtests/results/lora_bench.json")
    args = p.parse_args(argv)
    from server.model.loader import resolve_source

    source = resolve_source(args.model).resolve()
    report: dict = {"model": args.model, "concurrency": args.concurrency, "num_requests": args.num_requests,
                    "input_len": args.input_len, "output_len": args.output_len}
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        if args.skip != "lora":
            report["lora"] = lora_phases(args, source, Path(tmp))
        if args.skip != "models-dir":
            report["models_dir"] = switch_phase(args, source, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
