"""How a model that mixes sliding-window and full-attention layers keeps its KV cache: layers in groups over one
pool of pages, so that blocks sliding out of a window go back to the pool every other layer draws from.

A page holds one block (block_size positions) of `slots` layers. Full-attention layers fill groups of `slots`,
windowed ones their own groups of `slots` (the last group of each kind may leave slots empty); each group has its own
block table per sequence (the block manager's, hybrid_block_manager.py), and a windowed group's table drops the pages
behind its window. Gemma 3 (five local layers to one global) thus needs, per long sequence, one page per block of
context for its global layers and a window's worth for each local group, where a single table would keep every
layer's K/V for the whole context. Layer i's K/V lives in slot `layer_slot[i]` of the pages of its group's table.

Models whose layers all see the same span (every layer full, or every layer windowed) need no layout: one table,
every layer a slot (the plain `KVCache`), and an all-windowed model releases behind its window on that table."""
from __future__ import annotations

from dataclasses import dataclass

from server.model.config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    layer_group: tuple[int, ...]  # per layer: its group, 0 .. num_groups - 1 (group 0 holds full-attention layers)
    layer_slot: tuple[int, ...]  # per layer: its slot in a page, 0 .. slots - 1
    group_window: tuple[int | None, ...]  # per group: the largest window of its layers (None: full attention)
    slots: int  # layers per page

    @property
    def num_groups(self) -> int:
        return len(self.group_window)

    def window_blocks(self, group: int, block_size: int, step_tokens: int) -> int | None:
        """The most blocks a windowed group's table holds at once (None: full attention): its window, the step's new
        positions, the partial blocks at both ends and the block a prefix cache keeps as the next hash's parent."""
        window = self.group_window[group]
        return None if window is None else -(-(window + step_tokens) // block_size) + 2

    def blocks_for(self, num_tokens: int, block_size: int, step_tokens: int) -> int:
        """Pages a sequence of `num_tokens` positions holds at most, over every group's table."""
        context = -(-num_tokens // block_size)
        caps = (self.window_blocks(g, block_size, step_tokens) for g in range(self.num_groups))
        return sum(context if cap is None else min(context, cap) for cap in caps)

    def max_tokens(self, num_blocks: int, block_size: int, step_tokens: int) -> int:
        """The longest sequence `num_blocks` pages hold (blocks_for is monotonic: a binary search)."""
        low, high = 0, num_blocks * block_size
        while low < high:
            mid = (low + high + 1) // 2
            if self.blocks_for(mid, block_size, step_tokens) <= num_blocks:
                low = mid
            else:
                high = mid - 1
        return low


def kv_layout(cfg: ModelConfig) -> KVLayout | None:
    """The grouped layout of a model whose layers mix sliding windows and full attention; None where they do not.
    A page holds as many layers as the rarer kind has (Gemma 3 1B: 4 global and 22 local layers -> pages of 4
    layers: one full group, six local ones with two slots left empty in the last)."""
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    full = [i for i, w in enumerate(windows) if w is None]
    windowed = [i for i, w in enumerate(windows) if w is not None]
    if not full or not windowed:
        return None
    slots = min(len(full), len(windowed))
    group, slot, group_window = [0] * cfg.num_layers, [0] * cfg.num_layers, []
    for layers in (full, windowed):
        for start in range(0, len(layers), slots):
            members = layers[start:start + slots]
            for s, layer in enumerate(members):
                group[layer], slot[layer] = len(group_window), s
            group_window.append(None if layers is full else max(windows[i] for i in members))
    return KVLayout(tuple(group), tuple(slot), tuple(group_window), slots)
