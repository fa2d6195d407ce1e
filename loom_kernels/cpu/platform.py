"""The one place for facts about the CPU this process runs on: its model and flags (read from /proc/cpuinfo once),
what it can do fast (`CpuInfo`), the instruction set Loom's own C++ is held to (`force_isa`), the fingerprint that
names its builds, and giving freed heap pages back to the OS (`trim_heap`). Importing it does not import torch (the
load-test harness reads the CPU facts too)."""
from __future__ import annotations

import ctypes
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

# The levels a build may be held to: "native" is all this CPU has (-march=native); "avx2" leaves out AVX-512 (what
# `--cpu-isa avx2` forces, and how tests reach the AVX2 paths on an AVX-512 machine); "generic" every vector
# extension past SSE2 (the plain loops).
ISA_LEVELS = ("native", "avx2", "generic")
# The flags the kernel choices depend on: CpuInfo keeps these (a calibration cache key must not change with flags
# that change no choice).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
                "amx_int8")


@functools.cache
def _cpuinfo_fields() -> tuple[str, str]:
    """The first processor's "model name" and "flags" values ("" where /proc/cpuinfo lacks them)."""
    model, flags = "", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.strip()
    return model, flags


def cpu_model() -> str:
    """The CPU's model name, "" where the system does not say."""
    return _cpuinfo_fields()[0]


def cpu_flags() -> frozenset[str]:
    """Every feature flag the kernel reports for the CPU (empty where there is no /proc/cpuinfo)."""
    return frozenset(_cpuinfo_fields()[1].split())


def cpu_fingerprint() -> str:
    """Short hash of this CPU's model and flags, part of every build's name. Builds use -march=native and are cached
    on disk under their name: a cache shared between machines (a home directory, an image layer) must never hand a
    build made for AVX-512 to an AVX2-only CPU (SIGILL)."""
    model, flags = _cpuinfo_fields()
    return hashlib.sha256(f"{model}\n{flags}".encode()).hexdigest()[:10]


class _ForcedIsa:
    """The process-wide ISA level Loom's C++ builds and kernel choices are held to. A process serves one model on
    one CPU configuration: the loader sets it once from `--cpu-isa`, builds and `cpu_info()` read it."""

    def __init__(self) -> None:
        self.level = "native"


_FORCED = _ForcedIsa()


def _level(isa: str) -> str:
    level = "native" if isa in ("auto", "") else isa
    if level not in ISA_LEVELS:
        raise ValueError(f"unknown ISA level {isa!r}; one of auto, {', '.join(ISA_LEVELS)}")
    return level


def force_isa(isa: str) -> None:
    """Hold the extensions built from now on (and `cpu_info()`) to `isa`: an ISA_LEVELS name, "auto" = native."""
    _FORCED.level = _level(isa)


def current_isa() -> str:
    """The ISA level `force_isa` set ("native" until then)."""
    return _FORCED.level


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # the KERNEL_FLAGS this CPU has
    capability: str  # torch's dispatch level: DEFAULT, AVX2, AVX512
    forced: str  # the forced ISA level ("" = detect)

    @property
    def avx2_only(self) -> bool:
        return self.forced == "avx2" or self.capability in ("AVX2", "DEFAULT") or "avx512f" not in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere bf16 GEMMs are emulated and slow."""
        import torch
        return (not self.avx2_only and bool({"avx512_bf16", "amx_bf16"} & self.flags)
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @property
    def fast_int8(self) -> bool:
        # int8pack's AVX2 kernel measured 5-400x slower than the float32 GEMM: int8 only with AVX-512
        return not self.avx2_only


def cpu_info(forced_isa: str | None = None) -> CpuInfo:
    """What this CPU can do, held to `forced_isa` (`--cpu-isa`, LOOM_CPU_ISA: "auto" or "avx2"; default: what
    `force_isa` set). "avx2" takes the AVX2 choices on any CPU (pair it with torch's ATEN_CPU_CAPABILITY=avx2 and
    oneDNN's ONEDNN_MAX_CPU_ISA=AVX2 to hold the libraries to it too)."""
    import torch
    level = current_isa() if forced_isa is None else _level(forced_isa)
    return CpuInfo(cpu_model() or "unknown", cpu_flags() & frozenset(KERNEL_FLAGS),
                   torch.backends.cpu.get_cpu_capability(), "" if level == "native" else level)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # no glibc: nothing to trim
        return None
    return libc


def trim_heap() -> None:
    """glibc's malloc_trim(0): hand the heap's free pages back to the OS (glibc keeps them, so RSS would stay at a
    burst's high-water mark). A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
