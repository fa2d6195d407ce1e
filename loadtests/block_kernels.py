"""CPU quantized-linear kernels side by side: Loom's block kernels (loom_kernels/quant/blocks.py) against torch's
int4pack / int8pack on the default model's shapes, ms per call with the weights streamed from memory (each call
takes the next of `--copies` weights, so they are not in cache). The numbers behind the calibration's choices.

    python -m loadtests.block_kernels                 # bf16 activations, M = 1, 2, 4, 8
    python -m loadtests.block_kernels --dtype float32 # what an AVX2-only CPU runs (pair with ATEN_CPU_CAPABILITY=avx2)
"""
from __future__ import annotations

import argparse
import time

import torch

from loom_kernels.quant import (
    block_q4_linear,
    block_q8_linear,
    pack_block_q4,
    pack_block_q8,
    pack_q4,
    pack_q8,
    q4_linear,
    q8_linear,
    quantize_q4,
)

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def ms_per_call(fn, x: torch.Tensor, weights: list, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - started) / len(weights))
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rows", default="1,2,4,8", help="activation rows M")
    p.add_argument("--copies", type=int, default=30, help="distinct weights per shape (the head: 1, 28 MB each)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, activations {args.dtype}")
    print("| linear | M | Loom Q4 blocks | int4pack | Loom Q8_0 blocks | int8pack |\n|---|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        copies = 1 if name == "head" else args.copies
        codes, scale, zero = quantize_q4(torch.randn(n, k) * 0.05, 32)
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        forms = {"b4": [pack_block_q4(codes, scale, zero) for _ in range(copies)],
                 "i4": [pack_q4(codes, scale, zero, 32, dtype=dtype) for _ in range(copies)],
                 "b8": [pack_block_q8(q8, torch.rand(n, k // 32) * 0.01) for _ in range(copies)],
                 "i8": [pack_q8(q8, torch.rand(n), dtype=dtype) for _ in range(copies)]}
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k).to(dtype)
            t = [ms_per_call(block_q4_linear, x, forms["b4"]), ms_per_call(q4_linear, x, forms["i4"]),
                 ms_per_call(block_q8_linear, x, forms["b8"]), ms_per_call(q8_linear, x, forms["i8"])]
            print(f"| {name} {k}->{n} | {m} | " + " | ".join(f"{v:.4f}" for v in t) + " |", flush=True)


if __name__ == "__main__":
    main()
