"""KV memory of a model that mixes sliding-window and global layers (Gemma 3, Qwen2 with `max_window_layers`): its
grouped layout (server/model/kv_layout.py: a table per KV group over one pool of pages, the windowed groups giving
back what slid out of their window) against one table for every layer (each keeps the whole context), over the same
offline run of long prompts; and the longest sequence the same KV budget admits either way.

    python -m loadtests.kv_window_pages --model ~/.cache/loom-bench/random-gemma3-270m --prompt-tokens 3000 \\
        --new-tokens 128 --concurrency 4
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock

import torch

from loom_kernels.cpu.platform import cpu_model
from server.engine import EngineCore, EngineSettings, SamplingParams
from server.engine.offline import generate
from server.model import KVCache, ModelSettings, load_model


def run(lm, args: argparse.Namespace, grouped: bool) -> dict:
    single_table = mock.patch("server.engine.model_runner.kv_layout", return_value=None)
    with contextlib.nullcontext() if grouped else single_table:
        core = EngineCore(lm, EngineSettings(kv_cache_memory=args.kv_cache_gib, max_num_seqs=args.concurrency,
                                             speculative="none", enable_prefix_caching=False))
    cfg, layout, bm = lm.config, core.runner.layout, core.block_manager
    if grouped and layout is None:
        raise SystemExit("this model's layers do not mix sliding windows and full attention")
    page = KVCache.bytes_per_block(cfg.num_layers if layout is None else layout.slots, bm.block_size,
                                   cfg.num_kv_heads, cfg.head_dim, lm.dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, cfg.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.concurrency)]
    peak = [0]

    def on_step() -> None:
        peak[0] = max(peak[0], bm.num_blocks - bm.num_free_blocks)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outs = generate(core, prompts, params, on_step)
    elapsed = time.perf_counter() - started
    assert bm.num_free_blocks == bm.num_blocks, "KV pages leaked"
    return dict(peak_pages=peak[0], peak_mib=peak[0] * page / 2 ** 20, pages=bm.num_blocks,
                longest=core.limits.kv_capacity, seconds=elapsed, tokens=[o[0].token_ids for o in outs])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    args = p.parse_args(argv)
    lm = load_model(ModelSettings(model=args.model), progress=False)
    print(f"# {cpu_model()}, {args.model}: {args.concurrency} x ({args.prompt_tokens} -> {args.new_tokens}) tokens, "
          f"{args.kv_cache_gib} GiB of KV cache")
    print("| KV layout | peak KV in use | longest sequence the budget admits | run |")
    print("|---|---|---|---|")
    results = {}
    for grouped in (False, True):
        r = results[grouped] = run(lm, args, grouped)
        name = "grouped (windowed groups release)" if grouped else "one table (every layer keeps everything)"
        print(f"| {name} | {r['peak_mib']:.1f} MiB ({r['peak_pages']} of {r['pages']} pages) | {r['longest']} tokens "
              f"| {r['seconds']:.1f} s |")
    same = results[True]["tokens"] == results[False]["tokens"]
    print(f"\npeak KV {results[False]['peak_mib'] / results[True]['peak_mib']:.2f}x smaller grouped; "
          f"greedy tokens {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
