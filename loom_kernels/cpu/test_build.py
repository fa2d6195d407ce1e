"""Builds survive a kill at any moment: a `lock` file torch left behind does not block the next build, a build waits
for another process's build of the same extension and proceeds once that one ends (or dies), and a build's name
changes with every source and header it compiles, so a stale cached build is never loaded. Each test builds its own
tiny extension (a few seconds) under a fresh TORCH_EXTENSIONS_DIR."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest

from loom_kernels.cpu.build import (
    BLOCKS,
    BUILD_LOCK,
    DECODE_STACK,
    FUSED_OPS,
    KERNELS_ROOT,
    KQUANTS,
    LORA,
    PAGED_DECODE,
    build_cpu_extension,
    build_directory,
    extension_name,
    included_files,
)

EXTENSIONS = (PAGED_DECODE, FUSED_OPS, DECODE_STACK, BLOCKS, KQUANTS, LORA)  # every CPU extension the package builds

TINY = """#include <pybind11/pybind11.h>
#include "tiny.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.def("add", &add); }}
// {tag}: each test its own sources, so its own name (torch remembers a name's sources per process)
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch, request) -> Path:
    """A tiny extension's source in tmp_path, built under a TORCH_EXTENSIONS_DIR of its own."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    (tmp_path / "tiny.h").write_text("static int add(int a, int b) { return a + b; }\n")
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY.format(tag=f"{request.node.name} {os.getpid()} {time.time_ns()}"))
    return source


def tiny_build_dir(source: Path) -> Path:
    return build_directory(extension_name("loom_test_tiny", [source], False, "native"))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(300)
def test_a_stale_torch_lock_is_removed_and_the_build_finishes(tiny):
    stale = tiny_build_dir(tiny) / "lock"
    stale.touch()  # what a build killed midway leaves: torch waits for it to go, forever
    records, logger = Records(), logging.getLogger("loom.kernels")
    logger.addHandler(records)
    try:
        ext = build_cpu_extension("loom_test_tiny", [tiny], fast_math=False)
    finally:
        logger.removeHandler(records)
    assert ext.add(2, 3) == 5
    assert not stale.exists()
    [removed] = [r for r in records.records if r.getMessage() == "removed stale build lock"]
    assert removed.levelno == logging.WARNING and removed.path == str(stale)


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the build's flock until it is killed."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.timeout(300)
def test_a_build_waits_for_another_process_build_and_proceeds_when_it_dies(tiny):
    holder = hold_lock(tiny_build_dir(tiny) / BUILD_LOCK)
    result: dict[str, object] = {}
    builder = threading.Thread(target=lambda: result.update(ext=build_cpu_extension("loom_test_tiny", [tiny], False)))
    try:
        builder.start()
        builder.join(3)
        assert builder.is_alive() and not result  # waiting on the holder's lock
    finally:
        holder.kill()  # dies without releasing anything: the kernel drops its lock
        holder.wait()
    builder.join(240)
    assert result["ext"].add(4, 5) == 9


BUILD_IN_CHILD = """
import sys
from pathlib import Path
from loom_kernels.cpu.build import build_cpu_extension
build_cpu_extension("loom_test_tiny", [Path(sys.argv[1])], False)
"""


@pytest.mark.timeout(300)
def test_a_build_killed_midway_does_not_block_the_next(tiny):
    """The real thing: a process killed while torch builds (its `lock` file present), then a build here."""
    lock = tiny_build_dir(tiny) / "lock"
    child = subprocess.Popen([sys.executable, "-c", BUILD_IN_CHILD, str(tiny)], start_new_session=True,
                             env=os.environ | {"PYTHONPATH": str(KERNELS_ROOT.parent)})
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock.exists(), "the child never started its build"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its compiler, mid-build
        child.wait()
    assert lock.exists()
    assert build_cpu_extension("loom_test_tiny", [tiny], False).add(1, 1) == 2


def test_the_name_changes_with_every_source_and_header(tiny):
    header = tiny.parent / "tiny.h"
    name = extension_name("loom_test_tiny", [tiny], False, "native")
    assert included_files([tiny], [KERNELS_ROOT]) == [tiny.resolve(), header.resolve()]
    header.write_text(header.read_text() + "// changed\n")
    assert extension_name("loom_test_tiny", [tiny], False, "native") != name
    assert extension_name("loom_test_tiny", [tiny], False, "avx2").endswith("_avx2")
    assert extension_name("loom_test_tiny", [tiny], True, "native") != extension_name("loom_test_tiny", [tiny],
                                                                                      False, "native")


def test_two_installs_do_not_share_a_build(tiny, monkeypatch, tmp_path):
    """torch's build files name the sources by path: another install's kernels folder builds under another name."""
    import loom_kernels.cpu.build as build
    name = extension_name("loom_test_tiny", [tiny], False, "native")
    monkeypatch.setattr(build, "KERNELS_ROOT", tmp_path)
    assert extension_name("loom_test_tiny", [tiny], False, "native") != name


def test_every_kernel_source_and_header_ships_in_the_wheel():
    pyproject = KERNELS_ROOT.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("an installed copy: no pyproject.toml beside it")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["loom_kernels"]
    compiled = set()
    for ext in EXTENSIONS:
        compiled |= set(included_files([KERNELS_ROOT / s for s in ext.sources], [KERNELS_ROOT]))
    on_disk = {p.resolve() for p in KERNELS_ROOT.rglob("*") if p.suffix in (".cpp", ".h")}
    assert compiled <= on_disk and len(compiled) == 14
    for path in on_disk:
        assert any(fnmatch(path.relative_to(KERNELS_ROOT).as_posix(), p) for p in patterns), path


def test_every_extension_builds_where_there_is_a_compiler():
    """Where a C++ compiler exists, a source that does not compile is a failure here, not the skips of every test
    that needs the extension (they read a failed build as "no compiler", as the server falls back to serve)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    failed = [ext.name for ext in EXTENSIONS if ext() is None]
    assert not failed, f"these CPU extensions did not build (see the log's 'CPU extension unavailable'): {failed}"

