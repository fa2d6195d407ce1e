"""Modules built on the meta device with their initialisers skipped: the loader fills every weight afterwards. On meta
tensors torch's `nn.init` functions run through `torch._refs`, which imports `torch._dynamo` (seconds of start-up)
for values nobody reads; this is what transformers' `no_init_weights` does too."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

INITIALISERS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "zeros_", "ones_", "constant_")
_lock = threading.Lock()


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextmanager
def empty_modules() -> Iterator[None]:
    """Modules constructed inside get uninitialised parameters on the meta device (`to_empty` gives them storage)."""
    with _lock:
        saved = {name: getattr(nn.init, name) for name in INITIALISERS}
        for name in INITIALISERS:
            setattr(nn.init, name, _keep)
        try:
            with torch.device("meta"):
                yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)
