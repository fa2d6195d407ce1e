"""Fixtures shared by the server tests (tests/) and the kernel tests (loom_kernels/)."""
from __future__ import annotations

import pytest


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
