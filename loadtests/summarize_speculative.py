"""The summarize endpoint with and without speculative decoding: one server per `--speculative` mode on the same
model, the same ~6,000-character document (the first paragraphs of tests/support/data/english.txt) summarized
`--repeats` times one request at a time (greedy); reports the best wall time, the summary's tokens/s and whether
the summaries are identical across modes.

    python -m loadtests.summarize_speculative --modes none auto
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from loadtests.peers import REPO, ServerContext, free_port, start_server
from loom_kernels.cpu.platform import cpu_model

TEXT = REPO / "tests/support/data/english.txt"


def document(chars: int) -> str:
    """Whole paragraphs of the text, up to `chars` characters."""
    out = ""
    for para in TEXT.read_text().split("\n\n"):
        if len(out) + len(para) + 2 > chars:
            break
        out += para + "\n\n"
    return out.strip()


def measure(mode: str, doc: str, args) -> dict:
    ctx = ServerContext(port=free_port(), max_concurrency=8, loom_args=["--speculative", mode, *args.loom_args.split()])
    with start_server("loom", ctx, REPO / "loadtests/results/logs") as srv:
        body = {"input": doc, "max_tokens": args.max_tokens}
        httpx.post(srv.base_url + "/v1/summarize", json={**body, "max_tokens": 16}, timeout=600)  # warm-up
        best, summary, tokens = None, None, 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            r = httpx.post(srv.base_url + "/v1/summarize", json=body, timeout=600)
            seconds = time.perf_counter() - started
            r.raise_for_status()
            best = min(best or 1e9, seconds)
            summary, tokens = r.json()["summary"], r.json()["usage"]["completion_tokens"]
    return {"mode": mode, "seconds": round(best, 2), "completion_tokens": tokens,
            "output_tok_s": round(tokens / best, 1), "summary": summary}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["none", "auto"])
    p.add_argument("--chars", type=int, default=6000)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loom-args", default="")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    doc = document(args.chars)
    rows = [measure(mode, doc, args) for mode in args.modes]
    for row in rows:
        row["identical"] = row["summary"] == rows[0]["summary"]
        print(f"{row['mode']:5s} {row['seconds']:6.2f} s  {row['completion_tokens']} tokens  "
              f"{row['output_tok_s']:.1f} tok/s  {rows[0]['seconds'] / row['seconds']:.2f}x  "
              f"identical={row['identical']}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "document_chars": len(doc), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
