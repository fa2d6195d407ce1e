"""Fixtures shared by the server tests (tests/) and the kernel tests (loom_kernels/)."""
from __future__ import annotations

import os

import pytest

# The suite runs two test processes (and their servers) on two cores: OpenMP threads that spin while they wait for
# work starve the other process's threads, and a step takes several times longer. Sleeping waits cost a test nothing.
# Set before torch (and its OpenMP runtime) is loaded; servers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# The servers tests start compile grammars only where a test asks for one (a process that imports torch otherwise).
os.environ.setdefault("LOOM_GRAMMAR_WARMUP", "0")


@pytest.fixture
def kernel_env(monkeypatch):
    """Switch the kernels' backend (`LOOM_KERNELS`: "torch", "triton" or None) for one test; the choice is resolved
    once per process, so it is reset on every switch and again when the test ends."""
    from loom_kernels.backend import reset

    def switch(mode: str | None) -> None:
        if mode is None:
            monkeypatch.delenv("LOOM_KERNELS", raising=False)
        else:
            monkeypatch.setenv("LOOM_KERNELS", mode)
        reset()

    yield switch
    monkeypatch.undo()
    reset()
