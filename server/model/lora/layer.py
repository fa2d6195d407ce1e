"""A base linear (dense, oneDNN-packed or quantized, any of them) with the step's adapter deltas added to its output.

The adapters' weights sit in this module's slot stacks, `[max_loras, R, in]` and `[max_loras, out, R]`, padded with
zeros to the largest rank; the base weights are never changed, so the base model's rows of a mixed step are exactly
what they would be without adapters."""
from __future__ import annotations

import torch
from torch import nn

from loom_kernels import lora_add
from loom_kernels.lora.cpu_lora import CHUNK, lora_slot_meta
from server.model.lora.batch import ActiveLora


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, step: ActiveLora, max_loras: int, rank_capacity: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base, self.step = base, step
        self.in_features, self.out_features = base.in_features, base.out_features
        like = {"dtype": dtype, "device": device}
        self.register_buffer("lora_a", torch.zeros(max_loras, rank_capacity, self.in_features, **like),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, self.out_features, rank_capacity, **like),
                             persistent=False)
        # what each slot holds (its rank, B's non-zero column spans): the C++ decode stack reads only that
        self.register_buffer("lora_meta", torch.zeros(max_loras, 1 + 2 * -(-self.out_features // CHUNK),
                                                      dtype=torch.int32, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        active = self.step.batch
        if active is not None:
            lora_add(y, x, self.lora_a, self.lora_b, active.rows, active.seg_starts, active.seg_slots,
                     active.max_seg_len)
        return y

    def set_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Load one adapter's (A, B) into `slot` (zeros where the adapter leaves this module alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.lora_a[slot, :a.shape[0]].copy_(a)
            self.lora_b[slot, :, :b.shape[1]].copy_(b)
        self.lora_meta[slot] = lora_slot_meta(self.lora_a[slot], self.lora_b[slot])
