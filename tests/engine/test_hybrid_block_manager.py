"""HybridBlockManager and the grouped KV layout: one pool of pages, a table per KV group; windowed groups give back
what slid out of their window to the pool every group draws from; allocation takes every group's pages or none; a
prefix hit counts as far as every group holds it; a hypothesis state machine checks no page is leaked or owned twice."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from server.engine.block_manager import BlockManager
from server.engine.hybrid_block_manager import HybridBlockManager
from server.model.config import ModelConfig
from server.model.kv_layout import kv_layout
from tests.engine.test_block_manager import WindowedBlockManagerMachine
from tests.support.models import make_seq

BS = 4


def hybrid(num_blocks: int, windows=(None, 5, 5), caching: bool = True) -> HybridBlockManager:
    return HybridBlockManager(BlockManager(num_blocks, BS, enable_prefix_caching=caching), windows)


def tables(seq) -> list[list[int]]:
    return [seq.block_table] + [t.block_table for t in seq.group_tables]


def compute(bm: HybridBlockManager, seq, n: int) -> None:
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)
    bm.release_behind_window(seq)


def held(seq) -> list[int]:
    """Pages each group's table still holds (not released)."""
    return [len(seq.block_table) - seq.num_released_blocks] + [len(t.block_table) - t.num_released_blocks
                                                                for t in seq.group_tables]


def test_windowed_groups_hold_a_window_of_pages_and_give_the_rest_back():
    bm = hybrid(40, caching=False)
    seq = make_seq(list(range(60)), 0)
    compute(bm, seq, 4)
    for _ in range(56):
        compute(bm, seq, 1)
        # window 5: the next query at p sees p - 4 .. p, within at most two blocks of 4
        assert held(seq)[0] == -(-seq.num_computed_tokens // BS) and max(held(seq)[1:]) <= 2
    assert [len(t) for t in tables(seq)] == [15, 15, 15]  # every table indexed by position // block_size
    assert held(seq) == [15, 1, 1]  # the next query (60) sees 56..60: block 14, and block 15 is not taken yet
    assert bm.num_free_blocks == 40 - 15 - 2  # what the windows released went back to the shared pool
    bm.free_sequence(seq)
    assert bm.num_free_blocks == 40 and seq.group_tables[0].block_table == []


def test_allocation_takes_every_groups_pages_or_none():
    bm = hybrid(5, caching=False)
    a = make_seq(list(range(8)), 0)
    assert not bm.allocate(a, 8)  # 2 pages per group x 3 groups > 5
    assert tables(a) == [[], [], []] and bm.num_free_blocks == 5
    assert bm.allocate(a, 4) and [len(t) for t in tables(a)] == [1, 1, 1] and bm.num_free_blocks == 2
    assert len({p for t in tables(a) for p in t}) == 3  # each group its own page


def test_prefix_hits_count_as_far_as_every_group_holds_them():
    bm = hybrid(30)
    a = make_seq(list(range(13)), 0)
    compute(bm, a, 13)
    b = make_seq(list(range(12)) + [99], 1)
    hits = bm.match_prefix(b)
    assert hits == list(zip(*(t[:3] for t in tables(a))))  # blocks 0-2 of each group (released ones still cached)
    assert bm.allocate(b, 1, hits) and b.num_computed_tokens == 12
    assert [t[:3] for t in tables(b)] == [t[:3] for t in tables(a)]
    group1_block1 = tables(a)[1][1]
    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 30
    del bm.pool.cached[bm.pool.blocks[group1_block1].hash]  # group 1 forgets block 1: the common prefix ends there
    assert len(bm.match_prefix(make_seq(list(range(13)), 2))) == 1


def test_a_groups_freed_prefix_is_not_evicted_by_another_groups_new_pages():
    bm = hybrid(8, windows=(None, 8))
    a, d = make_seq(list(range(8)), 0), make_seq(list(range(20, 28)), 1)
    compute(bm, a, 8)
    compute(bm, d, 8)  # the pool is full: 2 pages per group each
    bm.free_sequence(a)  # a's pages are now the least recently freed, first to be evicted
    bm.free_sequence(d)
    b = make_seq(list(range(8)) + [9], 2)
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert bm.allocate(b, 1, hits)  # one new page per group, evicting d's pages, not the hits
    assert [t[:2] for t in tables(b)] == [list(h) for h in zip(*hits)]
    assert all(bm.pool.blocks[p].hash is not None for h in hits for p in h)


def test_gemma3_layout_groups_its_local_layers_by_the_globals_count():
    raw = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 16, "vocab_size": 1024, "max_position_embeddings": 32768, "sliding_window": 512,
           "sliding_window_pattern": 6, "query_pre_attn_scalar": 16}
    layout = kv_layout(ModelConfig.from_dict(raw))
    assert layout.slots == 4 and layout.group_window == (None,) + (512,) * 6  # 4 global, 22 local layers
    assert [layout.layer_group[i] for i in (5, 11, 17, 23)] == [0] * 4
    assert sorted(zip(layout.layer_group, layout.layer_slot)) == sorted(set(zip(layout.layer_group,
                                                                                layout.layer_slot)))  # no overlap
    # a 32k-token sequence: 2048 pages of its global layers, a window and a step's worth for each local group
    assert layout.blocks_for(32768, 16, 512) == 2048 + 6 * (64 + 2)
    assert layout.max_tokens(layout.blocks_for(32768, 16, 512), 16, 512) == 32768
    assert kv_layout(ModelConfig.from_dict({**raw, "sliding_window_pattern": 1})) is None  # all global: one table


class HybridBlockManagerMachine(WindowedBlockManagerMachine):
    """test_block_manager's rules (admit with prefix hits, grow, release behind the window, preempt and recompute,
    finish) over a hybrid pool: every page is owned by the live tables that hold it and by nothing else, and all come
    back."""

    def __init__(self):
        super().__init__()
        self.bm = hybrid(30)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def slide(self, data):
        self.bm.release_behind_window(data.draw(st.sampled_from(self.live)))

    @invariant()
    def accounting(self):
        pool, owners = self.bm.pool, {}
        for seq in self.live:
            states = [seq] + seq.group_tables
            for t in states:
                assert len(t.block_table) == -(-seq.num_tokens // BS)
                for b in t.block_table[t.num_released_blocks:]:
                    owners[b] = owners.get(b, 0) + 1
        for block in pool.blocks:
            assert block.ref_count == owners.get(block.block_id, 0)
            assert (block.ref_count == 0) == (block.block_id in pool.free or block.block_id in pool.fresh
                                              or block.block_id in pool.plain)
        for h, b in pool.cached.items():
            assert pool.blocks[b].hash == h

    def teardown(self):
        for seq in self.live:
            self.bm.free_sequence(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.pool.blocks)


TestHybridBlockManagerMachine = HybridBlockManagerMachine.TestCase
TestHybridBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
