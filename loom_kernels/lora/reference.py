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
