"""The CPU facts: read once, the kernel choices' properties, the process-wide ISA level, heap trimming."""
import pytest

from loom_kernels.cpu import platform


def test_cpu_facts_are_consistent():
    info = platform.cpu_info("auto")
    assert info.flags <= frozenset(platform.KERNEL_FLAGS) and info.flags <= platform.cpu_flags()
    assert info.model == (platform.cpu_model() or "unknown") and info.forced == ""
    assert platform.cpu_fingerprint() == platform.cpu_fingerprint() and len(platform.cpu_fingerprint()) == 10
    assert platform.cpu_info("avx2").avx2_only and not platform.cpu_info("avx2").fast_int8
    assert not platform.cpu_info("avx2").native_bf16


def test_the_forced_isa_is_one_process_wide_setting():
    assert platform.current_isa() == "native"
    try:
        platform.force_isa("avx2")
        assert platform.current_isa() == "avx2" and platform.cpu_info().forced == "avx2"
        assert platform.cpu_info("auto").forced == ""  # an explicit level wins
        with pytest.raises(ValueError, match="unknown ISA level"):
            platform.force_isa("avx1024")
    finally:
        platform.force_isa("auto")
    assert platform.current_isa() == "native" and platform.cpu_info().forced == ""


def test_trim_heap_runs():
    platform.trim_heap()
    platform.trim_heap()
