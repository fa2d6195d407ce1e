"""A step's LoRA description: which token rows of the flat batch carry which adapter slot, grouped into segments."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraBatch:
    rows: torch.Tensor  # [M] int64: the rows that carry an adapter, grouped by slot (the base model's rows are absent)
    seg_starts: torch.Tensor  # [G+1] int32: segment g is rows[seg_starts[g]:seg_starts[g + 1]]
    seg_slots: torch.Tensor  # [G] int32: the slot of each segment
    max_seg_len: int

    @classmethod
    def build(cls, spans: list[tuple[int, int, int]], device: torch.device) -> LoraBatch | None:
        """From (slot, first row, row count) per sequence with an adapter; None when no row has one."""
        by_slot: dict[int, list[int]] = {}
        for slot, first, count in spans:
            by_slot.setdefault(slot, []).extend(range(first, first + count))
        if not by_slot:
            return None
        rows, starts, slots = [], [0], []
        for slot in sorted(by_slot):
            rows.extend(by_slot[slot])
            starts.append(len(rows))
            slots.append(slot)
        return cls(torch.tensor(rows, dtype=torch.long, device=device),
                   torch.tensor(starts, dtype=torch.int32, device=device),
                   torch.tensor(slots, dtype=torch.int32, device=device),
                   max(len(r) for r in by_slot.values()))

    def slot_per_row(self, num_rows: int) -> torch.Tensor:
        """`[num_rows]` int64: each row's slot, -1 for the base model's rows (the decode stack's form)."""
        out = torch.full((num_rows,), -1, dtype=torch.long, device=self.rows.device)
        lens = (self.seg_starts[1:] - self.seg_starts[:-1]).long()
        out[self.rows] = torch.repeat_interleave(self.seg_slots.long(), lens)
        return out


@dataclass
class ActiveLora:
    """The segments of the step now running, shared by one model's wrapped linears: set only around a forward pass
    (threading them through every decoder's layer signatures would touch each architecture for one field)."""
    batch: LoraBatch | None = None
