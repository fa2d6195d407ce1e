"""A model's layer linears (the head left out) on each of several kernels, every linear once per pass in model order
with its weights streamed as a decode step streams them, the kernels alternated pass by pass in one process (this
VM's speed drifts by a third within minutes; separate runs do not compare).

    python -m loadtests.model_linears --model default --backends gguf_blocks gguf_q8 --rows 1 2 4
"""
from __future__ import annotations

import argparse
import time

import torch

from loom_kernels.cpu.platform import cpu_model
from server.model import ModelSettings, load_model
from server.model.weights.quant import QuantLinear


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--backends", nargs="+", default=["gguf_blocks", "gguf_q8"],
                   help="QuantLinear kinds every linear has a form for (gguf_blocks, gguf_q8, gguf_tiled, ...)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], help="activation rows M")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    lm = load_model(ModelSettings(model=args.model), progress=False)
    linears = [m for name, m in lm.model.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"]
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.model}: {len(linears)} linears, ms per pass "
          f"(min / median of {args.rounds})")
    for m in args.rows:
        inputs = [torch.randn(m, lin.in_features) for lin in linears]

        def one_pass(backend: str) -> float:
            started = time.perf_counter()
            for lin, x in zip(linears, inputs):
                lin.run(x, backend)
            return (time.perf_counter() - started) * 1e3

        times: dict[str, list[float]] = {b: [] for b in args.backends}
        for b in times:
            one_pass(b)  # warm-up
        for _ in range(args.rounds):
            for b in times:
                times[b].append(one_pass(b))
        cells = [f"{b} {min(v):.2f} / {sorted(v)[len(v) // 2]:.2f}" for b, v in times.items()]
        print(f"M={m}: " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
