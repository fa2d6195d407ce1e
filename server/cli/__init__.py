"""`loom`: the composition root on top of the layers. It builds each layer's settings from flags and `LOOM_*`
variables, loads the model, starts the engine and (for `serve`) the HTTP app. Nothing below imports it."""
from __future__ import annotations

import argparse
import os
import sys

from server.cli.generate import add_generate_command
from server.cli.serve import add_serve_command
from server.logs import setup_logging

# oneDNN keeps one compiled primitive per GEMM shape, up to 1,024 by default at ~240 KB each: every new prefill
# length adds one, so that cache alone can take ~250 MB of a long-running server (issue 14's soak). 256
# entries (LRU) keep the decode shapes hot and bound the cache at ~60 MB; a mixed workload ran no slower (Zen 4).
# Read by oneDNN when it builds its first primitive, so set before any model loads; an explicit setting wins.
ONEDNN_CACHE_ENTRIES = "256"


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
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
