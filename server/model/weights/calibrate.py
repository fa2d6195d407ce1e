"""Per-CPU kernel choice for the quantized linears: which backend (quant.BACKENDS) runs each linear at each batch
size M. A short measurement at load time (every layer's instance of a linear in turn, so weights stream from memory
as in a real step) picks the fastest per M bucket; the result is cached per CPU model, ISA flags, torch version,
thread count and shapes, so later starts skip it."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from loom_kernels.cpu.platform import cpu_info, trim_heap
from loom_kernels.quant import block_kernels_available
from server.model.cache_files import write_file_atomically
from server.model.weights.quant import (
    GGUF_FORMS,
    INT8_FORMS,
    QUANTIZED,
    QuantLinear,
    backends_for,
    form_bytes,
    resident_weight_bytes,
)

log = logging.getLogger("loom.model")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
STREAM_BYTES = 64 << 20  # a small-M timing pass reads at least this much weight (twice a large L3)
KERNELS_VERSION = 11  # bump when the candidate kernels change: cached plans of older sets are measured again


def group_linears(model: nn.Module) -> dict[str, list[QuantLinear]]:
    """Linears of one role and shape share a plan (e.g. the 30 `gate_up_proj`s)."""
    groups: dict[str, list[QuantLinear]] = defaultdict(list)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            groups[f"{name.rsplit('.', 1)[-1]}:{mod.out_features}x{mod.in_features}:{mod.quant_kind}"].append(mod)
    return dict(groups)


def time_backend(mods: list[QuantLinear], backend: str, m: int, dtype: torch.dtype) -> float:
    """Milliseconds per call at batch m: the fastest single call of two passes over the layers after a warm-up pass.
    Each call reads another layer's weights (streamed from memory, as in a step), and the fastest is the one no
    other process interrupted: on a busy 2-core machine a parallel region waits whole scheduler slices for a
    descheduled thread, which a per-pass mean turned into plans chosen by noise. Small M is bandwidth-bound: enough
    layers that a pass streams STREAM_BYTES (twice a large L3), at least 4; large M is compute-bound: 4 suffice."""
    layers = max(4, -(-STREAM_BYTES // max(1, mods[0].source.nbytes()))) if m <= 16 else 4
    use = mods[:layers]
    x = torch.randn(m, use[0].in_features).to(torch.float32 if use[0].float_output else dtype)
    best = float("inf")
    for rep in range(3):
        for mod in use:
            started = time.perf_counter()
            mod.run(x, backend)
            if rep:
                best = min(best, time.perf_counter() - started)
    return best * 1e3


def time_buckets(mods: list[QuantLinear], backend: str, dtype: torch.dtype) -> dict[int, float]:
    """Milliseconds per call at each M bucket. Above M = 64, once a kernel's time grows in proportion to M (the two
    buckets before within 15% of the same time per row: compute-bound), the larger buckets are extrapolated, not
    run: a decoding kernel at M = 512 would take most of a start. (Below, small-M kernels and tiled GEMMs change
    their efficiency with M, so every bucket is measured.)"""
    out: dict[int, float] = {}
    for m in BUCKETS:
        done = sorted(out)
        if m > 64 and len(done) >= 2:
            (m1, t1), (m2, t2) = [(b, out[b]) for b in done[-2:]]
            if abs((t2 / m2) / (t1 / m1) - 1) < 0.15:
                out[m] = t2 * m / m2
                continue
        out[m] = time_backend(mods, backend, m, dtype)
    return out


def measure_group(mods: list[QuantLinear], candidates: list[str], dtype: torch.dtype) -> dict[int, dict[str, float]]:
    timings: dict[int, dict[str, float]] = {m: {} for m in BUCKETS}
    for backend in candidates:
        try:
            for mod in mods:
                mod.build(backend)
        except RuntimeError as exc:  # e.g. oneDNN's bf16 prepack refuses CPUs without avx512bw
            log.info("kernel unavailable", extra={"backend": backend, "error": str(exc)[:120]})
            continue
        for m, ms in time_buckets(mods, backend, dtype).items():
            timings[m][backend] = round(ms, 4)
        for mod in mods:  # free the copy before building the next one
            mod.forms.pop(backend, None)
    return timings


def affordable(mods: list[QuantLinear], candidates: list[str], allowance: float) -> list[str]:
    """The first (the source's own, least-memory) form and every other whose copy of the group fits `allowance`."""
    source = mods[0].source
    return candidates[:1] + [c for c in candidates[1:] if form_bytes(source, c) * len(mods) <= allowance]


def fit_choice(choice: dict[int, str], timings: dict[int, dict[str, float]], mods: list[QuantLinear],
               base: str, allowance: float) -> tuple[dict[int, str], float]:
    """Drop the extra forms that save least time until the group's extra bytes fit; returns (choice, bytes used)."""
    source = mods[0].source
    def extra(c: dict[int, str]) -> float:
        return sum(form_bytes(source, b) for b in set(c.values()) - {base}) * len(mods)
    while extra(choice) > allowance:
        saved = {b: sum(timings[m][base] - timings[m][b] for m, x in choice.items() if x == b)
                 for b in set(choice.values()) - {base}}
        worst = min(saved, key=saved.get)
        choice = {m: base if b == worst else b for m, b in choice.items()}
    return choice, extra(choice)


def heuristic_plan(candidates: list[str]) -> dict[int, str]:
    """Without calibration: the quantized form for small M (bandwidth-bound), the best dense form (if any) above."""
    small = candidates[0]
    dense = next((b for b in ("bf16_packed", "bf16", "f32", "gguf_tiled") if b in candidates), small)
    if small not in QUANTIZED:
        small = dense
    return {m: small if m <= 8 else dense for m in BUCKETS}


def compact(choice: dict[int, str]) -> list[tuple[int, str]]:
    """{M bucket: backend} -> [(largest M, backend)] with neighbouring buckets merged."""
    plan: list[tuple[int, str]] = []
    for m in sorted(choice):
        if plan and plan[-1][1] == choice[m]:
            plan[-1] = (m, choice[m])
        else:
            plan.append((m, choice[m]))
    return plan


def int8_scope(activations: str, native_bf16: bool) -> str:
    """Where GGUF linears may take int8 activations: "all" steps (`int8`), "decode"-only steps (`auto` on a CPU
    without native bf16, where the alternative is float32: prompts and so the first token stay in float, the
    bandwidth-bound decode step gets llama.cpp's int8 dot products), or "none" (`float`, and `auto` where bf16
    activations are native and cheap)."""
    if activations == "auto":
        return "none" if native_bf16 else "decode"
    return {"int8": "all", "float": "none"}[activations]


def described(plan: list[tuple[int, str]]) -> str:
    return " ".join(f"<={m}:{b}" for m, b in plan)


def plan_kernels(model: nn.Module, dtype: torch.dtype, cache_dir: Path, calibrate: bool = True,
                 quantized_only: bool = False, forced_isa: str | None = None,
                 memory_factor: float = 1.3, activations: str = "auto") -> dict[str, list]:
    """Choose and install a plan (and a decode plan) on every QuantLinear of `model`; returns {group: plan}. Extra
    forms (dense copies for large batches, a second quantized layout) are kept only while all linears together stay
    within `memory_factor` x their stored bytes; `quantized_only` keeps each linear on its quantized forms at every
    M; `activations` (auto / float / int8, see `int8_scope`) says where GGUF linears may be measured and run with
    their input quantized to int8."""
    info = cpu_info(forced_isa)
    groups = group_linears(model)
    if not groups:
        return {}
    scope = int8_scope(activations, info.native_bf16)
    fingerprint = json.dumps([KERNELS_VERSION, block_kernels_available(), info.model, sorted(info.flags),
                              info.capability, info.forced, torch.__version__, torch.get_num_threads(), str(dtype),
                              sorted(groups), quantized_only, memory_factor, scope])
    path = cache_dir / "kernels" / f"{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.json"
    cached = json.loads(path.read_text()) if calibrate and path.is_file() else None
    started = time.perf_counter()
    allowance = (memory_factor - 1) * resident_weight_bytes(model)  # the weights as read, each storage once
    plans, choices, decode_choices, timings = {}, {}, {}, {}
    if calibrate and not cached:  # tens of seconds on a large model: say what the wait is
        log.info("measuring kernels for this CPU", extra={"groups": len(groups), "into": str(path)})
    for key, mods in groups.items():
        if cached and key in cached["plans"]:
            choice = {int(m): b for m, b in cached["plans"][key].items()}
            decode = {int(m): b for m, b in cached.get("decode_plans", {}).get(key, choice).items()}
        else:
            choice, decode, used = choose(mods, info, dtype, calibrate, quantized_only, allowance, timings, key,
                                          scope)
            allowance -= used
        choices[key], decode_choices[key], plans[key] = choice, decode, compact(choice)
        for mod in mods:
            mod.keep_only(plans[key], compact(decode))
    trim_heap()  # calibration's transient dense copies would otherwise stay in the resident set
    if calibrate and not cached:
        save_plans(path, info, dtype, choices, decode_choices, timings)
    log.info("kernel plan", extra={"source": "cache" if cached else ("measured" if calibrate else "heuristic"),
                                   "cpu": info.model, "capability": info.capability, "forced_isa": info.forced or None,
                                   "seconds": round(time.perf_counter() - started, 2),
                                   "weights_mb": round(resident_weight_bytes(model) / 1e6),
                                   "memory_factor": memory_factor, "int8_activations": scope,
                                   "plans": {k: described(p) for k, p in plans.items()},
                                   "decode_plans": {k: described(compact(d)) for k, d in decode_choices.items()
                                                    if d != choices[k]}})
    return plans


def choose(mods: list[QuantLinear], info, dtype: torch.dtype, calibrate: bool, quantized_only: bool,
           allowance: float, timings: dict, key: str, scope: str = "none"
           ) -> tuple[dict[int, str], dict[int, str], float]:
    """One group's {M bucket: backend} for every step, the same for decode-only steps, and the extra bytes kept.
    With int8 `scope` "decode" the decode choice takes an int8 form wherever it measured faster than the step's
    own choice (no memory: the int8 forms read the same blocks); with "all" both choices may take one."""
    candidates = backends_for(mods[0].source, info.native_bf16, info.fast_int8, block_kernels_available(),
                              mods[0].float_output, scope != "none")
    if quantized_only and candidates[0] in QUANTIZED:
        candidates = [c for c in candidates if c in QUANTIZED]
    candidates = affordable(mods, candidates, allowance)
    if len(candidates) == 1:  # nothing to choose between
        choice = {m: candidates[0] for m in BUCKETS}
        return choice, choice, 0.0
    if not calibrate:  # the heuristic never guesses int8: its accuracy is traded only where it was measured faster
        choice = heuristic_plan(candidates)
        used = sum(form_bytes(mods[0].source, b) for b in set(choice.values()) - {candidates[0]}) * len(mods)
        return choice, choice, used
    timings[key] = measure_group(mods, candidates, dtype)
    step_forms = {m: {b: t for b, t in ts.items() if scope == "all" or b not in INT8_FORMS}
                  for m, ts in timings[key].items()}
    choice, used = {m: fastest(t) for m, t in step_forms.items()}, 0.0
    if candidates[0] in timings[key][1]:  # else the base form failed to build: no budget to keep to
        choice, used = fit_choice(choice, step_forms, mods, candidates[0], allowance)
    if scope != "decode":
        return choice, choice, used
    decode = {}
    for m, ts in timings[key].items():
        int8 = min((b for b in ts if b in INT8_FORMS), key=ts.get, default=None)
        decode[m] = int8 if int8 is not None and ts[int8] < ts[choice[m]] else choice[m]
    return choice, decode, used


READY_FORMS = GGUF_FORMS  # the file's own blocks: nothing to build at each start
READY_MARGIN = 1.05


def fastest(timings: dict[str, float]) -> str:
    """The fastest backend, but one that runs the file's blocks as read where it is within 5% of it: another
    layout (int4pack, re-laid blocks) is rebuilt from the codes at every start, seconds for a whole model."""
    best = min(timings, key=timings.get)
    ready = [b for b in timings if b in READY_FORMS]
    if best in READY_FORMS or not ready:
        return best
    near = min(ready, key=timings.get)
    return near if timings[near] <= READY_MARGIN * timings[best] else best


def save_plans(path: Path, info, dtype: torch.dtype, choices: dict, decode_choices: dict, timings: dict) -> None:
    text = json.dumps({"cpu": info.model, "flags": sorted(info.flags), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "dtype": str(dtype), "plans": choices,
                       "decode_plans": decode_choices, "timings_ms": timings}, indent=1)
    write_file_atomically(path, lambda tmp: tmp.write_text(text))
