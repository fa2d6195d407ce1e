"""Building Loom's C++ CPU kernels: the .cpp files beside each kernel's Python wrapper, compiled by torch's
cpp_extension for this CPU and cached on disk by torch (a build takes ~20-30 s; loading a cached one, milliseconds).

A build's name carries everything its binary depends on: the kernel's name, this CPU (`cpu_fingerprint`), the ISA
level it is held to, and a hash of its sources, every header they include, the flags and torch's version. Any change
gives a new name, so a stale cached build is never loaded. Builds hold an `flock` on a file in their build directory:
it serializes builds of one extension across threads and processes and dies with its holder, so a build killed
midway never blocks the next one (torch's own `lock` file, which a killed build leaves behind, is removed under it)."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from loom_kernels.backend import kernel_backend
from loom_kernels.cpu.platform import cpu_fingerprint, cpu_flags, current_isa

log = logging.getLogger("loom.kernels")

KERNELS_ROOT = Path(__file__).resolve().parents[1]  # loom_kernels/: sources include "cpu/prelude.h" etc. from here
# Compiler flags per ISA level (platform.ISA_LEVELS), on top of -march=native.
ISA_CFLAGS = {"native": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx", "-mno-f16c", "-mno-fma"]}
BUILD_LOCK = "loom-build.lock"  # our flock file in each build directory (torch's own is `lock`)
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def included_files(sources: Sequence[Path], include_paths: Sequence[Path]) -> list[Path]:
    """The sources and every file they `#include "..."`, transitively (resolved as the compiler does: beside the
    including file first, then the include paths), in a stable order. System headers (`<...>`) are left out."""
    seen: dict[Path, None] = {}
    todo = [Path(s).resolve() for s in sources]
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        seen[path] = None
        for name in _INCLUDE.findall(path.read_text()):
            for base in (path.parent, *include_paths):
                if (base / name).is_file():
                    todo.append((base / name).resolve())
                    break
    return list(seen)


def compiler_flags(fast_math: bool, isa: str) -> tuple[list[str], list[str]]:
    """(cflags, ldflags) for a build held to the ISA level `isa`."""
    cflags = ["-O3", "-march=native", *ISA_CFLAGS[isa], "-fopenmp"] + (["-ffast-math"] if fast_math else [])
    return cflags, (["-fopenmp", "-lmvec"] if fast_math else ["-fopenmp"])


def effective_isa(isa: str) -> str:
    """`isa`, or "native" where holding the build to it changes nothing (AVX2 on a CPU without AVX-512): one build
    instead of two identical ones."""
    return "native" if isa == "avx2" and "avx512f" not in cpu_flags() else isa


def extension_name(name: str, sources: Sequence[Path], fast_math: bool, isa: str) -> str:
    """`name`, this CPU's fingerprint, a hash of the sources, their headers, their folder, the flags and torch's
    version, and the ISA level where it is not native. The folder: torch's build files name the sources by path and
    rebuild when it changes, so two installs sharing the extensions root would otherwise rebuild each other's."""
    cflags, ldflags = compiler_flags(fast_math, isa)
    digest = hashlib.sha256(f"{torch.__version__}\n{' '.join(cflags + ldflags)}\n{KERNELS_ROOT.resolve()}\n".encode())
    for path in included_files(sources, [KERNELS_ROOT]):
        digest.update(path.read_bytes())
    suffix = "" if isa == "native" else f"_{isa}"
    return f"{name}_{cpu_fingerprint()}_{digest.hexdigest()[:12]}{suffix}"


def build_directory(full_name: str) -> Path:
    """Where torch builds and caches the extension (under TORCH_EXTENSIONS_DIR, else torch's default root)."""
    from torch.utils.cpp_extension import _get_build_directory
    path = Path(_get_build_directory(full_name, verbose=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Exclusive `flock` on the build directory's BUILD_LOCK: one build of an extension at a time, across threads
    (each takes its own open file) and processes; the kernel drops it when its holder dies."""
    with open(build_dir / BUILD_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build of the extension", extra={"build_dir": str(build_dir)})
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_torch_lock(build_dir: Path, full_name: str) -> None:
    """Torch's build leaves its `lock` file behind when its process is killed, and every later load of the
    extension then waits for it forever. Called under `build_lock`: no live build of ours is using it."""
    lock = build_dir / "lock"
    if lock.exists():
        lock.unlink(missing_ok=True)
        log.warning("removed stale build lock", extra={"extension": full_name, "path": str(lock)})


def build_cpu_extension(name: str, sources: Sequence[Path], fast_math: bool, isa: str | None = None):
    """Compile (or load the cached build of) one C++ extension from `sources` (one of them with the PYBIND11_MODULE)
    for this CPU, held to `isa` (default: what `force_isa` set). Headers are included relative to loom_kernels/.
    Raises when there is no compiler; callers fall back to the PyTorch references."""
    from torch.utils.cpp_extension import load
    isa = effective_isa(isa or current_isa())
    cflags, ldflags = compiler_flags(fast_math, isa)
    full_name = extension_name(name, sources, fast_math, isa)
    build_dir = build_directory(full_name)
    with build_lock(build_dir):
        remove_stale_torch_lock(build_dir, full_name)
        fresh = not (build_dir / f"{full_name}.so").is_file()
        if fresh:  # the one slow moment of a first start on this CPU: say so, not a silent minute
            log.info("building CPU extension", extra={"extension": name, "isa": isa, "build_dir": str(build_dir)})
        started = time.perf_counter()
        module = load(name=full_name, sources=[str(s) for s in sources], extra_cflags=cflags, extra_ldflags=ldflags,
                      extra_include_paths=[str(KERNELS_ROOT)], build_directory=str(build_dir), verbose=False)
        if fresh:
            log.info("built CPU extension", extra={"extension": name, "seconds": round(time.perf_counter() - started, 1)})
        return module


class CpuExtension:
    """One of Loom's CPU extensions: its name, its .cpp files (under loom_kernels/), whether it may use -ffast-math,
    and what serves instead when it cannot be built. `ext()` is its module for the forced ISA level, `ext(isa)` for
    another one: built once per process and level (`ext.build`, cached), None without a compiler."""

    def __init__(self, name: str, sources: tuple[str, ...], fast_math: bool, fallback: str):
        self.name, self.sources, self.fast_math, self.fallback = name, sources, fast_math, fallback
        self.build = functools.cache(self._build)

    def __call__(self, isa: str | None = None):
        return self.build(isa or current_isa())

    def _build(self, isa: str):
        try:
            return build_cpu_extension(self.name, [KERNELS_ROOT / s for s in self.sources], self.fast_math, isa)
        except Exception as exc:  # noqa: BLE001 - no compiler / headers: the fallback serves instead
            log.warning("CPU extension unavailable", extra={"extension": self.name, "fallback": self.fallback,
                                                            "reason": str(exc)[:200]})
            return None


# Fast math for the attention's exp (vectorized through libmvec). None for the fused ops and the block GEMMs: it would
# fuse and reorder their float math away from the references' roundings (and the GGUF de-quantizer is bit-exact).
PAGED_DECODE = CpuExtension("loom_cpu_paged_decode", ("attention/cpu_decode.cpp",), True, "the PyTorch reference")
FUSED_OPS = CpuExtension("loom_cpu_fused_ops", ("fused_cpu/cpu_ops.cpp",), False, "the PyTorch references")
DECODE_STACK = CpuExtension("loom_cpu_decode_stack", ("fused_cpu/decode_stack.cpp",), True, "the Python layer loop")
BLOCKS = CpuExtension("loom_cpu_blocks", ("quant/blocks.cpp",), False, "the other quantized backends")
KQUANTS = CpuExtension("loom_cpu_kquants", ("quant/kquants.cpp",), False, "the other quantized backends")
LORA = CpuExtension("loom_cpu_lora", ("lora/cpu_lora.cpp",), False, "the PyTorch reference")


def build_cpu_kernels() -> dict[str, bool]:
    """Build (or load the cached builds of) Loom's CPU extensions now, side by side (each is one compiler process:
    a first start on 2 cores takes about half as long as one after another); returns which are available (as the
    kernels' own availability checks answer). Each is otherwise built on its first use, and a build takes ~20-60 s:
    at start-up that only delays readiness, inside a request it stalls every stream."""
    serving = kernel_backend().mode != "torch"  # LOOM_KERNELS=torch: the references serve, no build is needed
    wanted = {"paged_decode": PAGED_DECODE, "fused_ops": FUSED_OPS, "decode_stack": DECODE_STACK, "blocks": BLOCKS,
              "kquants": KQUANTS, "lora": LORA}
    if not serving:  # the quantized weights have no PyTorch reference kernels: still built
        wanted = {"blocks": BLOCKS, "kquants": KQUANTS}
    isa = current_isa()
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        built = dict(zip(wanted, pool.map(lambda ext: ext(isa) is not None, wanted.values())))
    names = ("paged_decode", "fused_ops", "decode_stack", "blocks", "kquants", "lora")
    return {name: built.get(name, False) for name in names}
