"""The flat batch the model runs on, and the paged KV cache it reads and writes.

The engine builds a `FlatBatch` per step: prefill chunks of some sequences and one decode token of others, laid out
as one token dimension. Prefill sequences come first (rows `0:num_prefill_tokens`, split by `cu_seqlens_q`), then
one row per decoding sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.model.kv_layout import KVLayout
    from server.model.lora.batch import LoraBatch


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor  # [B, max_blocks] int32, prefill sequences first
    seq_lens: torch.Tensor  # [B] int32: cached tokens of each sequence once this step's tokens are written
    cu_seqlens_q: torch.Tensor  # [P+1] int32: row bounds of the P prefill sequences
    num_prefill_seqs: int
    num_prefill_tokens: int
    logits_indices: torch.Tensor  # [N] int64: rows whose logits are wanted
    lora: LoraBatch | None = None  # the rows that carry a LoRA adapter, by slot (built on the model's device)
    # a grouped KV layout (model/kv_layout.py): every group's slots [G, T] and tables [G, B, max_blocks], group 0's
    # being `slot_mapping` / `block_tables`
    group_slot_mapping: torch.Tensor | None = None
    group_block_tables: torch.Tensor | None = None

    def tables_for(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping, block_tables) of KV group `group` (without a grouped layout every layer reads group 0's)."""
        if group == 0 or self.group_block_tables is None:
            return self.slot_mapping, self.block_tables
        return self.group_slot_mapping[group], self.group_block_tables[group]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> FlatBatch:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return FlatBatch(**moved)

    @classmethod
    def build(cls, prefills: list[tuple[list[int], int, list[int]]], decodes: list[tuple[int, int, list[int]]],
              block_size: int, logits_rows: list[int] | None = None,
              group_tables: list[list[list[int]]] | None = None) -> FlatBatch:
        """Build a batch from plain lists (tests, `loom generate` before the engine exists).

        prefills: (new token ids, number already cached, block table) per sequence;
        decodes: (token id, number already cached, block table) per sequence;
        group_tables: for a grouped KV layout, each sequence's (prefills', then decodes') tables of groups 1...
        Logits default to the last row of every sequence."""
        ids, pos, row_seq, tables, lens, cu, last = [], [], [], [], [], [0], []
        for tokens, start, table in prefills + [([tok], start, table) for tok, start, table in decodes]:
            ids += tokens
            pos += range(start, start + len(tokens))
            row_seq += [len(tables)] * len(tokens)
            tables.append(table)
            lens.append(start + len(tokens))
            last.append(len(ids) - 1)
            if len(cu) <= len(prefills):
                cu.append(len(ids))

        groups = [tables] + ([list(g) for g in zip(*group_tables)] if group_tables else [])
        width = max((len(t) for g in groups for t in g), default=0)
        slots = [[g[i][p // block_size] * block_size + p % block_size for i, p in zip(row_seq, pos)] for g in groups]
        padded = [[t + [0] * (width - len(t)) for t in g] for g in groups]
        slot_mapping = torch.tensor(slots, dtype=torch.long).reshape(len(groups), len(ids))
        block_tables = torch.tensor(padded, dtype=torch.int32).reshape(len(groups), len(tables), width)
        grouped = len(groups) > 1
        return cls(input_ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(pos, dtype=torch.long),
                   slot_mapping=slot_mapping[0], block_tables=block_tables[0],
                   seq_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                   num_prefill_seqs=len(prefills), num_prefill_tokens=cu[-1],
                   logits_indices=torch.tensor(last if logits_rows is None else logits_rows, dtype=torch.long),
                   group_slot_mapping=slot_mapping if grouped else None,
                   group_block_tables=block_tables if grouped else None)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, align: int = 64) -> torch.Tensor:
    """A zero-filled CPU tensor whose pages are only committed when first written: calloc (numpy's zeros) maps fresh
    zero pages for a large block instead of writing zeros through it as torch.zeros does, so a KV pool costs resident
    memory for the blocks that have held tokens, not for its whole size at start. 64-byte aligned for the kernels."""
    import numpy as np
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype).view(shape)


@dataclass
class KVCache:
    """Per-layer K and V caches, each `[num_blocks, block_size, num_kv_heads, head_dim]`, views of one tensor. With
    a grouped `layout` (model/kv_layout.py) a block is a page of `layout.slots` layers: layer i's views are slot
    `layout.layer_slot[i]` of every page, addressed through its group's tables."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    num_blocks: int
    block_size: int
    layout: KVLayout | None = None

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", layout: KVLayout | None = None) -> KVCache:
        slots = num_layers if layout is None else layout.slots
        shape = (slots, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            data = lazy_zeros(shape, dtype)
        else:
            data = torch.zeros(shape, dtype=dtype, device=device)
        slot_of = range(num_layers) if layout is None else layout.layer_slot
        return cls(k=[data[slot_of[i], 0] for i in range(num_layers)],
                   v=[data[slot_of[i], 1] for i in range(num_layers)],
                   num_blocks=num_blocks, block_size=block_size, layout=layout)

    @staticmethod
    def readable(cache: torch.dtype, activations: torch.dtype) -> bool:
        """Whether the attention kernels read a cache of `cache` under `activations`: the same dtype, or float16 /
        bfloat16 under float32 (read widened)."""
        return cache == activations or (activations == torch.float32 and cache in (torch.float16, torch.bfloat16))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one block of `num_layers` layers (a page of a grouped layout: its `slots`)."""
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
