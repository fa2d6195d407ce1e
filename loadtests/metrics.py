"""Per-request measurements and their aggregation, following vLLM's benchmark_serving definitions.

- TTFT: request sent -> first chunk carrying generated text.
- ITL: the gaps between successive text-carrying chunks (one entry per gap; a chunk holding several tokens is one
  gap, as in vLLM).
- TPOT: per request, (E2E - TTFT) / (output_tokens - 1); requests with one output token have none.
- E2E: request sent -> the stream's end (`[DONE]` or the connection closing).
- Throughputs divide totals over successful requests by the benchmark's wall-clock duration.
- Goodput: successful requests per second that meet every SLO given (TTFT, TPOT, E2E), as in vLLM.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    kind: str = "completion"
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None  # seconds
    latency: float = 0.0  # seconds, end to end
    itl: list[float] = field(default_factory=list)  # seconds
    start: float = 0.0  # seconds since the benchmark started
    usage_reported: bool = False  # output_tokens came from the server's usage, not from counting chunks
    max_tokens: int | None = None  # what a generation request asked for (exact with ignore_eos)
    chunks: int = 0
    error: str | None = None
    status: str = ""  # the mixed soak's outcome label (loadtests/mixed.py)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def _stats(name: str, values_s: list[float], percentiles=PERCENTILES) -> dict:
    """mean/median/std/pN of a list of seconds, in milliseconds (NaN-free: empty lists give None)."""
    out: dict = {}
    arr = np.asarray(values_s, dtype=float) * 1000.0
    have = arr.size > 0
    out[f"mean_{name}_ms"] = float(arr.mean()) if have else None
    out[f"median_{name}_ms"] = float(np.median(arr)) if have else None
    out[f"std_{name}_ms"] = float(arr.std()) if have else None
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p)) if have else None
    return out


def error_reason(message: str) -> str:
    """A short bucket for an error message: 'http 500', 'timeout', 'ConnectError', ..."""
    return message.split(":", 1)[0].strip()[:60]


def summarize(results: list[RequestResult], duration: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, slo_e2e_ms: float | None = None,
              percentiles=PERCENTILES) -> dict:
    ok = [r for r in results if r.ok]
    duration = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(error_reason(r.error or "unknown") for r in results if not r.ok)),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "output_tokens_from_usage": sum(r.usage_reported for r in ok),
        # generation requests that got fewer tokens than they asked for (the server did not ignore EOS?)
        "short_outputs": sum(1 for r in ok if r.max_tokens and r.output_tokens < r.max_tokens),
    }
    out.update(_stats("ttft", [r.ttft for r in ok if r.ttft is not None], percentiles))
    out.update(_stats("tpot", [t for r in ok if (t := r.tpot) is not None], percentiles))
    out.update(_stats("itl", [g for r in ok for g in r.itl], percentiles))
    out.update(_stats("e2el", [r.latency for r in ok], percentiles))

    slo = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2el_ms": slo_e2e_ms}
    if any(v is not None for v in slo.values()):
        good = 0
        for r in ok:
            if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > slo_ttft_ms):
                continue
            tpot = r.tpot
            if slo_tpot_ms is not None and tpot is not None and tpot * 1000 > slo_tpot_ms:
                continue
            if slo_e2e_ms is not None and r.latency * 1000 > slo_e2e_ms:
                continue
            good += 1
        out["slo"] = {k: v for k, v in slo.items() if v is not None}
        out["good_requests"] = good
        out["goodput"] = good / duration
        out["slo_attainment"] = good / len(results) if results else math.nan
    return out


def format_report(name: str, s: dict) -> str:
    """A vLLM-style text table."""
    lines = [f"{' ' + name + ' ':=^60}"]

    def row(label, value, fmt="{:.2f}"):
        lines.append(f"{label:<42}{fmt.format(value) if value is not None else 'n/a':>18}")

    row("Successful requests:", s["completed"], "{}")
    row("Failed requests:", s["failed"], "{}")
    if s["errors"]:
        for k, v in s["errors"].items():
            row(f"  {k}:", v, "{}")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"], "{}")
    row("Total generated tokens:", s["total_output_tokens"], "{}")
    row("Request throughput (req/s):", s["request_throughput"])
    if "goodput" in s:
        row("Request goodput (req/s):", s["goodput"])
        row("SLO attainment:", s["slo_attainment"], "{:.1%}")
    row("Input token throughput (tok/s):", s["input_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{' ' + title + ' ':-^60}")
        row(f"Mean {key.upper()} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {key.upper()} (ms):", s[f"median_{key}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {key.upper()} (ms):", s.get(f"p{p}_{key}_ms"))
    lines.append("=" * 60)
    return "\n".join(lines)
