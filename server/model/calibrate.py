"""Per-CPU kernel choice for the quantized linears: which backend (quant.BACKENDS) runs each linear at each batch
size M. A short measurement at load time (every layer's instance of a linear in turn, so weights stream from memory
as in a real step) picks the fastest per M bucket; the result is cached per CPU model, ISA flags, torch version,
thread count and shapes, so later starts skip it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loom_kernels.quant import block_kernels_available
from server.model.quant import QUANTIZED, QuantLinear, backends_for

log = logging.getLogger("loom.model")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
KERNELS_VERSION = 3  # bump when the candidate kernels change: cached plans of older sets are measured again
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    capability: str  # torch's dispatch level: DEFAULT, AVX2, AVX512
    forced: str  # ModelSettings.cpu_isa ("" = detect)

    @property
    def avx2_only(self) -> bool:
        return self.forced == "avx2" or self.capability in ("AVX2", "DEFAULT") or "avx512f" not in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere bf16 GEMMs are emulated and slow."""
        return (not self.avx2_only and bool({"avx512_bf16", "amx_bf16"} & self.flags)
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @property
    def fast_int8(self) -> bool:
        return not self.avx2_only  # int8pack's AVX2 kernel measured 5-400x slower than fp32 (issue 11)


def cpu_info(forced_isa: str = "auto") -> CpuInfo:
    """What this CPU can do. `forced_isa="avx2"` (`--cpu-isa avx2`, LOOM_CPU_ISA) takes the AVX2 choices on any CPU
    (pair it with torch's
    ATEN_CPU_CAPABILITY=avx2 and oneDNN's ONEDNN_MAX_CPU_ISA=AVX2 to force the libraries too)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return CpuInfo(model, frozenset(flags & set(ISA_FLAGS)), torch.backends.cpu.get_cpu_capability(),
                   "" if forced_isa == "auto" else forced_isa)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def group_linears(model: nn.Module) -> dict[str, list[QuantLinear]]:
    """Linears of one role and shape share a plan (e.g. the 30 `gate_up_proj`s)."""
    groups: dict[str, list[QuantLinear]] = defaultdict(list)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            groups[f"{name.rsplit('.', 1)[-1]}:{mod.out_features}x{mod.in_features}:{mod.quant_kind}"].append(mod)
    return dict(groups)


def time_backend(mods: list[QuantLinear], backend: str, m: int, dtype: torch.dtype) -> float:
    """Milliseconds per call at batch m: best of two passes over the layers after a warm-up pass."""
    use = mods if m <= 16 else mods[:4]  # large M is compute-bound: a few layers suffice
    x = torch.randn(m, use[0].in_features).to(dtype)
    best = float("inf")
    for rep in range(3):
        started = time.perf_counter()
        for mod in use:
            mod.run(x, backend)
        if rep:
            best = min(best, (time.perf_counter() - started) * 1e3 / len(use))
    return best


def measure_group(mods: list[QuantLinear], candidates: list[str], dtype: torch.dtype) -> dict[int, dict[str, float]]:
    timings: dict[int, dict[str, float]] = {m: {} for m in BUCKETS}
    for backend in candidates:
        try:
            for mod in mods:
                mod.build(backend)
        except RuntimeError as exc:  # e.g. oneDNN's bf16 prepack refuses CPUs without avx512bw
            log.info("kernel unavailable", extra={"backend": backend, "error": str(exc)[:120]})
            continue
        for m in BUCKETS:
            timings[m][backend] = round(time_backend(mods, backend, m, dtype), 4)
        for mod in mods:  # free the copy before building the next one
            mod.forms.pop(backend, None)
    return timings


def heuristic_plan(candidates: list[str]) -> dict[int, str]:
    """Without calibration: the quantized form for small M (bandwidth-bound), the best dense form above."""
    dense = next(b for b in ("bf16_packed", "bf16", "f32") if b in candidates)
    small = candidates[0] if candidates[0] in QUANTIZED else dense
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


def plan_kernels(model: nn.Module, dtype: torch.dtype, cache_dir: Path, calibrate: bool = True,
                 quantized_only: bool = False, forced_isa: str = "auto") -> dict[str, list]:
    """Choose and install a plan on every QuantLinear of `model`; returns {group: plan}. `quantized_only` keeps each
    linear on its quantized form at every M (no dense copies: least memory, slower at large M)."""
    info = cpu_info(forced_isa)
    groups = group_linears(model)
    if not groups:
        return {}
    fingerprint = json.dumps([KERNELS_VERSION, block_kernels_available(), info.model, sorted(info.flags),
                              info.capability, info.forced, torch.__version__, torch.get_num_threads(), str(dtype),
                              sorted(groups), quantized_only])
    path = cache_dir / "kernels" / f"{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.json"
    cached = json.loads(path.read_text()) if calibrate and path.is_file() else None
    started = time.perf_counter()
    plans, choices, timings = {}, {}, {}
    for key, mods in groups.items():
        if cached and key in cached["plans"]:
            choice = {int(m): b for m, b in cached["plans"][key].items()}
        else:
            candidates = backends_for(mods[0].source, info.native_bf16, info.fast_int8, block_kernels_available())
            if quantized_only and candidates[0] in QUANTIZED:
                candidates = [c for c in candidates if c in QUANTIZED]
            if calibrate:
                timings[key] = measure_group(mods, candidates, dtype)
                choice = {m: min(t, key=t.get) for m, t in timings[key].items()}
            else:
                choice = heuristic_plan(candidates)
        choices[key], plans[key] = choice, compact(choice)
        for mod in mods:
            mod.keep_only(plans[key])
    release_freed_memory()  # calibration's transient dense copies would otherwise stay in the resident set
    if calibrate and not cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"cpu": info.model, "flags": sorted(info.flags), "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "dtype": str(dtype),
                                   "plans": choices,
                                   "timings_ms": timings}, indent=1))
        tmp.replace(path)
    log.info("kernel plan", extra={"source": "cache" if cached else ("measured" if calibrate else "heuristic"),
                                   "cpu": info.model, "capability": info.capability, "forced_isa": info.forced or None,
                                   "seconds": round(time.perf_counter() - started, 2),
                                   "plans": {k: " ".join(f"<={m}:{b}" for m, b in p) for k, p in plans.items()}})
    return plans
