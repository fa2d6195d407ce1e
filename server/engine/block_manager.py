"""Fixed pool of KV-cache blocks: per-sequence block tables, reference counts and automatic prefix caching.

A full block is identified by hash(parent block's hash, its token ids). Blocks whose reference count drops to zero
go to the free list but keep their hash, so a later request with the same prefix can take them back; new
allocations evict from the least recently freed end.

A freed block that holds no cached prefix (a sequence's partial tail, rejected draft slots) is worth nothing and is
handed out first; freed prefixes are evicted only after it.

With `touch_fresh_last` (the CPU pool, whose pages are committed on first write) a block never used yet is handed out
before a freed prefix is evicted only while the pool has touched fewer than `retain_share` of its blocks: resident
memory then follows the most blocks in use at once plus that share kept for prefixes (a later turn of a chat, a
system prompt shared over time), not every distinct block history has passed through.

With a `window` (every attention layer slides over at most that many positions) a running sequence's leading blocks
that no query can reach again are released after each step: their references are dropped but their table entries
stay (the kernels index a table by position // block_size, and no query sees a key outside its window), counted by
the sequence's `num_released_blocks` so that nothing is dropped twice. A released block shared with another sequence
stays alive; one holding a cached prefix stays findable on the free list, as after `free_sequence`.

A model that mixes windowed and full-attention layers keeps one table per KV group (model/kv_layout.py) over one
pool: `group_view(g, window)` is a manager of group g's tables (`seq.group_tables[g - 1]`) sharing this pool's
blocks, free lists and prefix cache (its hashes chain from a root of its own). Group 0's (the sequence's own table)
keeps the sequence's progress; the others leave it alone (hybrid_block_manager.py).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.sequence import GroupTable, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 touch_fresh_last: bool = False, retain_share: float = 0.25, window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.touch_fresh_last = touch_fresh_last
        # freed blocks holding a cached prefix, in LRU order; freed ones holding none in `plain` (taken first); with
        # touch_fresh_last the never-used ones wait in `fresh`
        self.free: OrderedDict[int, None] = OrderedDict()
        self.plain: list[int] = [] if touch_fresh_last else list(range(num_blocks - 1, -1, -1))
        self.fresh: list[int] = list(range(num_blocks - 1, -1, -1)) if touch_fresh_last else []
        self.retain_blocks = int(retain_share * num_blocks)
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.window = window  # the largest sliding window of the layers it serves; None: some layer sees everything
        self.group = 0

    def group_view(self, group: int, window: int | None) -> BlockManager:
        """A manager of KV group `group`'s tables over this same pool (the containers are shared, not copied)."""
        view = copy.copy(self)
        view.group, view.window = group, window
        return view

    def table(self, seq: Sequence) -> Sequence | GroupTable:
        """Where this group's table of `seq` lives (`block_table`, `num_hashed_blocks`, `num_released_blocks`)."""
        if self.group == 0:
            return seq
        while len(seq.group_tables) < self.group:
            seq.group_tables.append(GroupTable())
        return seq.group_tables[self.group - 1]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.plain) + len(self.fresh)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent, token_ids))

    def root_hash(self, seq: Sequence) -> int | None:
        """The parent of a sequence's first block: its LoRA adapter's, so adapters never share cached blocks (the
        same tokens have other K/V under another adapter), and its KV group's (other layers' K/V)."""
        lora = seq.params.lora
        root = None if lora is None else hash(("lora", lora.id))
        return root if self.group == 0 else hash(("kv group", self.group, root))

    def _evict_lru(self) -> int:
        """Take a block holding no prefix, else a fresh one while the pool may touch more, else the least recently
        freed prefix (forgotten)."""
        touched = self.num_blocks - len(self.fresh)
        if self.plain or (self.fresh and (not self.free or touched < self.retain_blocks)):
            block_id = self.plain.pop() if self.plain else self.fresh.pop()
            self.blocks[block_id].ref_count = 1
            return block_id
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`'s tokens. At least one token is always left to compute, since
        the last prompt position's logits are needed; with prompt logprobs, every row from the one predicting
        `prompt_logprobs_start` on is computed too."""
        if not self.enable_prefix_caching:
            return []
        computable = seq.num_tokens - 1
        if seq.params.prompt_logprobs is not None:
            computable = min(computable, seq.params.prompt_logprobs_start - 1)
        hits, parent = [], self.root_hash(seq)
        usable = computable // self.block_size
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = self.block_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def new_blocks(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> int:
        """Blocks `allocate` takes off the free lists beyond the prefix hits."""
        needed = self.blocks_needed(seq.num_computed_tokens + len(prefix_blocks) * self.block_size + num_new_tokens)
        return max(needed - len(self.table(seq).block_table) - len(prefix_blocks), 0)

    def blocks_to_take(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> int:
        """Free blocks `allocate` would use: the new ones and the prefix hits sitting on the free list."""
        reclaimed = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        return self.new_blocks(seq, num_new_tokens, prefix_blocks) + reclaimed

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after the prefix hits, on first admission).
        Returns False, changing nothing, when the pool is short."""
        if self.blocks_to_take(seq, num_new_tokens, prefix_blocks) > self.num_free_blocks:
            return False
        new = self.new_blocks(seq, num_new_tokens, prefix_blocks)
        self.claim(seq, prefix_blocks)
        self.extend(seq, new)
        return True

    def claim(self, seq: Sequence, prefix_blocks: list[int]) -> None:
        """Take the prefix hits into `seq`'s table (off the free list where they wait there)."""
        t = self.table(seq)
        for block_id in prefix_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:  # a freed block still holding this prefix: take it back off the free list
                del self.free[block_id]
            block.ref_count += 1
            t.block_table.append(block_id)
        if prefix_blocks:
            t.num_hashed_blocks = len(prefix_blocks)
            if self.group == 0:  # the sequence's progress is group 0's to keep
                seq.num_computed_tokens = seq.num_cached_tokens = len(prefix_blocks) * self.block_size

    def extend(self, seq: Sequence, count: int) -> None:
        t = self.table(seq)
        for _ in range(count):
            t.block_table.append(self._evict_lru())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        t = self.table(seq)
        first = t.num_hashed_blocks
        parent = self.blocks[t.block_table[first - 1]].hash if first else self.root_hash(seq)
        for i in range(first, seq.num_computed_tokens // self.block_size):
            block = self.blocks[t.block_table[i]]
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = self.block_hash(parent, tokens)
            block.hash, block.token_ids = parent, tokens
            self.cached.setdefault(parent, block.block_id)
            t.num_hashed_blocks = i + 1

    def release_uncomputed(self, seq: Sequence) -> None:
        """Free `seq`'s blocks past those its computed tokens need: the slots of rejected draft tokens. Such a block
        is this sequence's alone and holds no cached prefix, so it goes where the next allocation takes first."""
        t = self.table(seq)
        keep = max(self.blocks_needed(seq.num_computed_tokens), t.num_released_blocks)
        while len(t.block_table) > keep:
            block_id = t.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
                self.plain.append(block_id)

    def release_behind_window(self, seq: Sequence) -> int:
        """Drop `seq`'s references to its leading blocks that no layer reads again; returns how many were released now.

        A query at position p reads keys p - window < j <= p (loom_kernels/attention/reference.py; the Triton and C++
        kernels start at the same key), and no query comes before position `num_computed_tokens`: a decode row there,
        the draft rows after it, or the next prefill chunk. Keys below num_computed_tokens + 1 - window are dead."""
        t = self.table(seq)
        if self.window is None or not t.block_table:
            return 0
        dead = max(seq.num_computed_tokens + 1 - self.window, 0) // self.block_size
        if self.enable_prefix_caching:  # the next block's hash chains from the last registered one's: keep that one
            dead = max(min(dead, t.num_hashed_blocks - 1), 0)
        first = t.num_released_blocks
        for block_id in t.block_table[first:dead]:
            self._drop(block_id)
        t.num_released_blocks = max(first, dead)
        return max(dead - first, 0)

    def _drop(self, block_id: int) -> None:
        """One reference fewer; at none a block holding a cached prefix stays findable (LRU), any other is plain."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None or self.cached.get(block.hash) != block_id:
                block.hash, block.token_ids = None, ()
                self.plain.append(block_id)
            else:
                self.free[block_id] = None

    def free_sequence(self, seq: Sequence) -> None:
        """Drop `seq`'s references (not those it released already); the tail goes to the free list first so shared
        prefixes are evicted last."""
        t = self.table(seq)
        for block_id in reversed(t.block_table[t.num_released_blocks:]):
            self._drop(block_id)
        t.block_table = []
        t.num_hashed_blocks = t.num_released_blocks = 0
        if self.group == 0:
            seq.num_computed_tokens = 0
