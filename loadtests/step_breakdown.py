"""Where a decode step goes: the one-call C++ stack (every layer: linears, norms, rotary, K/V write, paged
attention) over `--batch` sequences of `--context` cached tokens, against its linears alone, called one after
another in model order with the backends the decode plan picks at that many rows, and the LM head. The stack minus
its linears is attention and what a fused per-layer step could still save; `--kv-cache-dtype` shows what the KV
cache's element type costs the attention.

    python -m loadtests.step_breakdown --model default --context 256 [--batch 32] [--kv-cache-dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch

from loom_kernels.cpu.platform import cpu_model
from server.engine import EngineCore, EngineSettings
from server.model import FlatBatch, ModelSettings, load_model
from server.model.weights.quant import QuantLinear


def timed(f, rounds: int, calls: int) -> list[float]:
    """ms per call of each round, sorted."""
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            f()
        out.append((time.perf_counter() - started) / calls * 1e3)
    return sorted(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--context", type=int, default=256, help="tokens already in the sequence's KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together (one row each)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    lm = load_model(ModelSettings(model=args.model), progress=False)
    per_seq = args.context // EngineSettings().block_size + 1
    core = EngineCore(lm, EngineSettings(max_num_seqs=max(8, args.batch), speculative="none",
                                         kv_cache_dtype=args.kv_cache_dtype,
                                         num_kv_blocks=args.batch * per_seq))  # the blocks the tables below name
    model, cache = lm.model, core.runner.kv_cache
    if model.decode_stacks is None:
        raise SystemExit("this model does not run on the C++ decode stack here")
    bs = core.block_manager.block_size
    batch = FlatBatch.build([], [(123 + i, args.context, list(range(i * per_seq, (i + 1) * per_seq)))
                                 for i in range(args.batch)], bs)
    x = model.model.embed_tokens(batch.input_ids)
    if not model.decode_stacks.takes(batch, cache):
        raise SystemExit("the stack does not take this step")
    linears = [m for name, m in model.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"]
    inputs = [(m, torch.randn(args.batch, m.in_features), m.pick(args.batch, decode=True))  # as the stack runs them
              for m in linears]
    head = model.lm_head
    hidden = torch.randn(args.batch, head.in_features)

    def stack() -> None:
        with torch.no_grad():
            model.decode_stacks.run(x, batch)

    def alone() -> None:
        for m, a, backend in inputs:
            m.run(a, backend)

    def logits() -> None:
        with torch.no_grad():
            model.compute_logits(hidden)

    for f in (stack, alone, logits):
        timed(f, 2, 5)  # warm-up
    rows = {"stack": [], "linears alone": [], "head": []}
    for _ in range(args.rounds):  # interleaved: the VM's speed drifts
        rows["stack"] += timed(stack, 1, 10)
        rows["linears alone"] += timed(alone, 1, 10)
        rows["head"] += timed(logits, 1, 10)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.model}, batch {args.batch}, "
          f"context {args.context}, "
          f"KV cache {str(cache.k[0].dtype).removeprefix('torch.')}, "
          f"{len(linears)} linears on {sorted({b for _, _, b in inputs})}")
    for name, ms in rows.items():
        ms.sort()
        print(f"{name:14s} min {ms[0]:6.2f} ms  median {ms[len(ms) // 2]:6.2f} ms")


if __name__ == "__main__":
    main()
