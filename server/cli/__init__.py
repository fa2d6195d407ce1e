"""`loom`: the composition root on top of the layers. It builds each layer's settings from flags and `LOOM_*`
variables, loads the model, starts the engine and (for `serve`) the HTTP app. Nothing below imports it."""
from __future__ import annotations

import argparse
import sys

from server.cli.generate import add_generate_command
from server.cli.serve import add_serve_command
from server.logs import setup_logging


def main(argv: list[str] | None = None) -> None:
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
