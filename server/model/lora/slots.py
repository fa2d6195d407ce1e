"""The adapter slots of one model: its target linears wrapped in `LoraLinear`, `max_loras` slots in each, and which
adapter occupies which slot (least recently used out first). A step binds its `LoraBatch` around the forward pass."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from server.model.config import UnsupportedModelError
from server.model.lora.adapter import SHARDS_PER_MODULE, LoraAdapter
from server.model.lora.batch import ActiveLora, LoraBatch
from server.model.lora.layer import LoraLinear


class LoraSlots:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, dtype, device
        self.modules: dict[str, LoraLinear] = {}
        self.resident: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.step = ActiveLora()  # set only inside `bound`: the wrapped linears read the step's segments there
        self._install(model)

    def _install(self, model: nn.Module) -> None:
        layers = getattr(getattr(model, "model", None), "layers", None)
        for i, layer in enumerate(layers or []):
            for part in ("self_attn", "mlp"):
                owner = getattr(layer, part, None)
                for name, shards in SHARDS_PER_MODULE.items():
                    base = getattr(owner, name, None)
                    if isinstance(base, LoraLinear):  # a second engine over the same model: its own slots
                        base = base.base
                    if base is not None and hasattr(base, "in_features"):
                        wrapped = LoraLinear(base, self.step, self.max_loras, shards * self.max_rank, self.dtype,
                                             self.device)
                        setattr(owner, name, wrapped)
                        self.modules[f"model.layers.{i}.{part}.{name}"] = wrapped
        if not self.modules:
            raise UnsupportedModelError(f"LoRA adapters need a decoder with q/k/v/o and gate/up/down projections; "
                                        f"{type(model).__name__} has none")

    def slot_of(self, adapters: list[LoraAdapter]) -> dict[int, int]:
        """Slots for a step's distinct adapters (at most `max_loras`), loading those not resident over the least
        recently used others. Returns adapter id -> slot."""
        if len(adapters) > self.max_loras:
            raise RuntimeError(f"a step holds {len(adapters)} adapters, more than max_loras={self.max_loras}")
        for adapter in adapters:
            if adapter.id in self.resident:
                self.resident.move_to_end(adapter.id)
        for adapter in adapters:
            if adapter.id not in self.resident:
                free = set(range(self.max_loras)) - set(self.resident.values())
                slot = min(free) if free else self.resident.popitem(last=False)[1]
                for name, module in self.modules.items():
                    module.set_slot(slot, adapter.weights.get(name))
                self.resident[adapter.id] = slot
        return {a.id: self.resident[a.id] for a in adapters}

    @contextlib.contextmanager
    def bound(self, batch: LoraBatch | None) -> Iterator[None]:
        self.step.batch = batch
        try:
            yield
        finally:
            self.step.batch = None
