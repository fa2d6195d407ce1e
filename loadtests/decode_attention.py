"""What the KV cache's element type costs the decode attention: the CPU paged decode kernel over every layer of a
model's shape, float32 queries against float32 / float16 / bfloat16 caches, timed interleaved in one process (this
VM's speed drifts by a third within minutes; separate runs do not compare).

    python -m loadtests.decode_attention --batch 32 --context 256
    python -m loadtests.decode_attention --batch 1 --context 2048 --layers 16 --heads 32 --kv-heads 8
"""
from __future__ import annotations

import argparse
import time

import torch

from loom_kernels.attention.cpu_decode import cpu_decode_available, paged_attention_decode_cpu
from loom_kernels.cpu.platform import cpu_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    p.add_argument("--context", type=int, default=256, help="cached tokens per sequence")
    p.add_argument("--layers", type=int, default=30, help="default: the default model's (SmolLM2-135M)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args(argv)
    if not cpu_decode_available():
        raise SystemExit("the CPU paged decode kernel is not built here (no C++ compiler)")
    per_seq = -(-args.context // args.block_size)
    table = torch.arange(args.batch * per_seq, dtype=torch.int32).view(args.batch, per_seq)
    lens = torch.full((args.batch,), args.context, dtype=torch.int32)
    q = torch.randn(args.batch, args.heads, args.head_dim)
    shape = (args.batch * per_seq, args.block_size, args.kv_heads, args.head_dim)
    caches = {name: [(torch.randn(shape).to(dt), torch.randn(shape).to(dt)) for _ in range(args.layers)]
              for name, dt in DTYPES.items()}
    scale = args.head_dim ** -0.5

    def step(name: str) -> float:
        started = time.perf_counter()
        for k, v in caches[name]:
            paged_attention_decode_cpu(q, k, v, table, lens, scale)
        return (time.perf_counter() - started) * 1e3

    for name in caches:
        step(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(args.rounds):
        for name in caches:
            times[name].append(step(name))
    print(f"{cpu_model()}, {torch.get_num_threads()} threads: {args.layers} layers x {args.batch} sequences x "
          f"{args.context} tokens, {args.heads}/{args.kv_heads} heads x {args.head_dim}")
    per_token = args.layers * 2 * args.kv_heads * args.head_dim
    for name, ms in times.items():
        ms.sort()
        mib = per_token * DTYPES[name].itemsize * args.batch * args.context / 2 ** 20
        print(f"{name:9s} cache ({mib:7.1f} MiB read per step): min {ms[0]:7.2f} ms  median {ms[len(ms) // 2]:7.2f} ms")


if __name__ == "__main__":
    main()
