"""KV blocks of a model that mixes sliding-window and full-attention layers (Gemma 3, Qwen2 past `max_window_layers`):
one pool of pages, one block table per KV group (model/kv_layout.py), one interface.

Every group's table grows with the sequence's positions alike (the kernels index each by position // block_size), so
a step takes as many new pages per group; a windowed group then drops the leading pages that slid out of its window
after each step (block_manager.py's release), back into the pool the full-attention groups draw from too. A step's
pages come for every group or for none; a prefix hit counts as far as every group still holds it. The scheduler and
the engine see a `BlockManager`'s methods, with the pool's free pages and usage."""
from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence


class HybridBlockManager:
    def __init__(self, pool: BlockManager, group_windows: tuple[int | None, ...]):
        if group_windows[0] is not None:
            raise ValueError("KV group 0 holds the full-attention layers")
        self.pool = pool
        self.groups = [pool] + [pool.group_view(g, w) for g, w in enumerate(group_windows) if g]
        self.block_size, self.num_blocks = pool.block_size, pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        """Pages `num_tokens` more positions take at most, one per block per group."""
        return len(self.groups) * self.pool.blocks_needed(num_tokens)

    def match_prefix(self, seq: Sequence) -> list[tuple[int, ...]]:
        """Per cached block of the longest prefix every group holds, each group's page."""
        return list(zip(*(g.match_prefix(seq) for g in self.groups)))

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[tuple[int, ...]] = ()) -> bool:
        prefixes = [[hit[g] for hit in prefix_blocks] for g in range(len(self.groups))]
        if sum(g.blocks_to_take(seq, num_new_tokens, p) for g, p in zip(self.groups, prefixes)) > self.num_free_blocks:
            return False
        new = [g.new_blocks(seq, num_new_tokens, p) for g, p in zip(self.groups, prefixes)]
        # every group's hits before any new page (a new page may evict a freed prefix); group 0 last, as its claim
        # moves the sequence's progress past the prefix, which the others' counts start from
        for group, prefix in reversed(list(zip(self.groups, prefixes))):
            group.claim(seq, prefix)
        for group, count in zip(self.groups, new):
            group.extend(seq, count)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        for group in self.groups:
            group.cache_full_blocks(seq)

    def release_uncomputed(self, seq: Sequence) -> None:
        for group in self.groups:
            group.release_uncomputed(seq)

    def release_behind_window(self, seq: Sequence) -> int:
        return sum(group.release_behind_window(seq) for group in self.groups[1:])

    def free_sequence(self, seq: Sequence) -> None:
        for group in reversed(self.groups):  # group 0 last: it resets the sequence's progress
            group.free_sequence(seq)
