"""The fastest an encoder forward can be on this CPU: its linears alone, each at the best rate this machine's bf16
GEMMs reach (plain `F.linear` or oneDNN's prepacked weight, whichever is faster for the shape), for one static batch.
Everything else a forward does (attention, LayerNorm, GELU, pooling) and everything serving adds (tokenizing,
HTTP) only lowers it, so `ceiling / peer` bounds what any implementation at the same precision can reach against a
peer's measured texts/s.

    python -m loadtests.encoder_ceiling --tokens 32 256 --batch 64 --peer 426.9 41.9
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def seconds_per_call(fn, budget_s: float = 1.5) -> float:
    for _ in range(3):
        fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls


def best_linear_seconds(m: int, k: int, n: int) -> float:
    x, w, b = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.zeros(n).bfloat16()
    times = [seconds_per_call(lambda: F.linear(x, w, b))]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=m)
        times.append(seconds_per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")))
    except RuntimeError:  # oneDNN's bf16 prepack needs avx512bw or avx_ne_convert
        pass
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384, help="all-MiniLM-L6-v2's by default")
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 256], help="tokens per text")
    p.add_argument("--batch", type=int, default=64, help="texts per static batch")
    p.add_argument("--peer", type=float, nargs="*", default=[], help="a peer's texts/s, one per --tokens")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, f = args.hidden, args.intermediate
    shapes = [(h, 3 * h), (h, h), (h, f), (f, h)]  # fused q/k/v, attention output, intermediate, output
    for i, tokens in enumerate(args.tokens):
        m = args.batch * tokens
        layer = 0.0
        for k, n in shapes:
            s = best_linear_seconds(m, k, n)
            layer += s
            print(f"{tokens} tokens, M={m}, {k}x{n}: {s * 1e3:.2f} ms ({2 * m * k * n / s / 1e9:.0f} GFLOP/s)")
        ceiling = args.batch / (layer * args.layers)
        line = f"{tokens} tokens: linears alone {layer * args.layers * 1e3:.1f} ms per batch -> {ceiling:.1f} texts/s"
        if i < len(args.peer):
            line += f" = {ceiling / args.peer[i]:.2f}x the peer's {args.peer[i]}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
