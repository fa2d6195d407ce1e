"""PyTorch reference of the segmented LoRA product (the CPU serving path): per adapter segment, shrink then expand."""
import torch


def lora_add_ref(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, rows: torch.Tensor,
                 seg_starts: torch.Tensor, seg_slots: torch.Tensor) -> None:
    """`y[rows[i]] += (x[rows[i]] @ a_stack[s].T) @ b_stack[s].T` for the rows `i` of each segment, `s` its slot.
    The delta sits beside the base product; the base weights are never touched."""
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    for g, slot in enumerate(slots):
        seg = rows[starts[g]:starts[g + 1]]
        if seg.numel() == 0:
            continue
        delta = (x.index_select(0, seg) @ a_stack[slot].t()) @ b_stack[slot].t()
        y.index_add_(0, seg, delta.to(y.dtype))


def lora_segments(row_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(rows, seg_starts, seg_slots)` of a slot per row (-1: the base model): the rows with an adapter, grouped by
    slot in increasing order, one segment per slot."""
    keep = (row_slots >= 0).nonzero().flatten()
    slots = row_slots[keep]
    order = torch.sort(slots, stable=True).indices
    seg_slots, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return keep[order], starts.to(torch.int32), seg_slots.to(torch.int32)
