"""`loom`: the composition root on top of the layers. It builds each layer's settings from flags and `LOOM_*`
variables, loads the model, starts the engine and (for `serve`) the HTTP app. Nothing below imports it."""
from __future__ import annotations

import argparse
import os
import sys

from server.cli.generate import add_generate_command
from server.cli.serve import add_serve_command
from server.logs import setup_logging

# Two shape-keyed caches of compiled GEMM primitives sit under torch's oneDNN ops: oneDNN's own
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY, default 1,024) and ideep's in front of it (LRU_CACHE_CAPACITY, default 1,024),
# ~0.25-0.3 MB an entry. Every new prefill length adds an entry to each, so together they let a long-running
# server's RSS creep by ~500 MB over hours. 256 entries each (LRU) keep the decode shapes hot and
# bound both at ~150 MB; a miss costs ~1 ms per linear. Read when the first primitive is built, so set before any
# model runs; an operator's own values win.
NATIVE_CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}


def bound_native_caches() -> None:
    for name, entries in NATIVE_CACHE_BOUNDS.items():
        os.environ.setdefault(name, entries)


def main(argv: list[str] | None = None) -> None:
    bound_native_caches()
    parser = argparse.ArgumentParser(prog="loom", description="Loom LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_command(sub)
    add_serve_command(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
