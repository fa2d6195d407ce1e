"""The `loom` entry point's process-wide settings."""
from __future__ import annotations

import os

import pytest

from server.cli import ONEDNN_CACHE_ENTRIES, main


def test_onednn_primitive_cache_is_bounded_unless_set(monkeypatch):
    """oneDNN's default of 1,024 cached GEMM primitives let a server's RSS creep for tens of minutes (issue 14):
    `loom` lowers it before any model loads, and leaves an operator's own value alone."""
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == ONEDNN_CACHE_ENTRIES == "256"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
