"""C++ shared by Loom's CPU kernels (compiled with torch's cpp_extension): the includes, the widening loads, and the
one build function every CPU extension goes through."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger("loom.kernels")

PRELUDE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Widening loads the compiler can vectorize (c10's conversions go through a function call per element).
static inline float widen(float x) { return x; }
static inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
static inline float widen(at::Half x) { return static_cast<float>(x); }
"""


def cpu_fingerprint() -> str:
    """Short hash of this CPU's model and flags. Extensions are built with -march=native and cached on disk by
    torch under their name: a cache shared between machines (a home directory, an image layer) must never hand a
    build made for AVX-512 to an AVX2-only CPU (SIGILL), so the name carries the CPU it was built for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


# Instruction sets a build may be held to below -march=native: "avx2" drops AVX-512 (what `--cpu-isa avx2` forces, and
# how tests reach the AVX2 paths on an AVX-512 machine), "generic" every vector extension past SSE2.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx", "-mno-f16c", "-mno-fma"]}
_forced_isa = "native"


def force_isa(isa: str) -> None:
    """Hold the extensions built from now on to `isa` (an ISA_FLAGS key; "auto" = native)."""
    global _forced_isa
    _forced_isa = "native" if isa == "auto" else isa


def current_isa() -> str:
    return _forced_isa


def build_cpu_extension(name: str, source: str, functions: list[str] | None, fast_math: bool, isa: str | None = None):
    """Compile (or load the cached build of) one C++ extension for this CPU, held to `isa` (default: what
    `force_isa` set). `functions=None`: the source has its own PYBIND11_MODULE. Raises when there is no compiler;
    callers fall back to the PyTorch references."""
    from torch.utils.cpp_extension import load_inline
    isa = isa or _forced_isa
    flags = ["-O3", "-march=native", *ISA_FLAGS[isa], "-fopenmp"] + (["-ffast-math"] if fast_math else [])
    suffix = "" if isa == "native" else f"_{isa}"
    return load_inline(name=f"{name}_{cpu_fingerprint()}{suffix}", cpp_sources=source, functions=functions,
                       extra_cflags=flags, extra_ldflags=["-fopenmp", "-lmvec"] if fast_math else ["-fopenmp"],
                       verbose=False)
