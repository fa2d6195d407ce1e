"""The `loom` entry point's process-wide settings."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from server.cli import NATIVE_CACHE_BOUNDS, main
from server.model.weights.linear import can_prepack

# Packed bf16 GEMMs at 400 distinct batch sizes (as 400 prefill lengths would run them), then the RSS kept after
# glibc gives back its free pages: what the primitive caches hold.
CACHE_GROWTH = textwrap.dedent("""
    import os, sys, torch
    if sys.argv[1] == "loom":
        from server.cli import bound_native_caches
        bound_native_caches()
    from loom_kernels.cpu.platform import trim_heap
    torch.set_num_threads(1)
    def rss_mib():
        trim_heap()
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1536, 576).bfloat16(), batch_size=64)
    b = torch.zeros(1536).bfloat16()
    torch.ops.mkldnn._linear_pointwise(torch.randn(8, 576).bfloat16(), w, b, "none", [], "")
    start = rss_mib()
    for m in range(9, 409):
        torch.ops.mkldnn._linear_pointwise(torch.randn(m, 576).bfloat16(), w, b, "none", [], "")
    print(rss_mib() - start)
""")


def cache_growth_mib(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in NATIVE_CACHE_BOUNDS}
    out = subprocess.run([sys.executable, "-c", CACHE_GROWTH, mode], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return int(out.stdout.split()[-1])


def test_native_primitive_caches_are_bounded():
    """torch's oneDNN GEMMs cache one compiled primitive per shape twice (oneDNN's cache and ideep's, 1,024 each by
    default): new prefill lengths made a server's RSS creep for hours. Under `loom`'s bounds 400 new
    shapes keep far less than with the defaults."""
    if not can_prepack(torch.zeros(1, dtype=torch.bfloat16)):  # the check the model's loader makes
        pytest.skip("oneDNN's bf16 prepack needs avx512bw or avx_ne_convert on this CPU")
    bounded, default = cache_growth_mib("loom"), cache_growth_mib("default")
    assert default > 100, f"400 shapes under the default caches kept only {default} MiB: the check would not bite"
    assert bounded < default - 60, (bounded, default)


def test_cache_bounds_are_set_unless_the_operator_set_them(monkeypatch):
    for name in NATIVE_CACHE_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert {name: os.environ[name] for name in NATIVE_CACHE_BOUNDS} == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
