"""BlockManager: allocation, prefix caching, LRU eviction, and a hypothesis state machine that checks no block is
ever leaked or double-owned and every reference count returns to zero."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence
from tests.support.models import make_seq


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def test_prefix_blocks_are_shared_and_reused_after_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(list(range(10)), 0)
    compute(bm, a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 7
    b = make_seq(list(range(8)) + [99, 98, 97], 1)
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]  # two full blocks match; the third differs
    assert bm.allocate(b, b.num_tokens - 8, hits)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 10
    c = make_seq(list(range(9)), 2)  # freed blocks still hold the prefix
    assert len(bm.match_prefix(c)) == 2


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(8)), 0)
    compute(bm, a, 8)
    b = make_seq(list(range(8)), 1)
    assert len(bm.match_prefix(b)) == 1  # 7 of 8 tokens may be cached; block-aligned that is one block


def test_prompt_logprobs_skip_the_cache():
    bm = BlockManager(num_blocks=4, block_size=4)
    compute(bm, make_seq(list(range(9)), 0), 9)
    assert bm.match_prefix(make_seq(list(range(9)), 1, prompt_logprobs=0)) == []


def test_lru_eviction_drops_the_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_seq([1, 2, 3], 0)
    compute(bm, a, 3)
    bm.free_sequence(a)
    b = make_seq([7, 8, 9, 10], 1)
    compute(bm, b, 4)  # needs both blocks: evicts a's cached prefix
    assert bm.match_prefix(make_seq([1, 2, 3], 2)) == []


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(list(range(12)), 0)
    assert not bm.allocate(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4)
        self.live: list[Sequence] = []
        self.next_id = 0

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(0, 5), min_size=1, max_size=10))
    def admit(self, prefix, tail):
        seq = make_seq(prefix + tail, self.next_id)
        self.next_id += 1
        hits = self.bm.match_prefix(seq)
        if self.bm.allocate(seq, seq.num_tokens - len(hits) * 4, hits):
            seq.num_computed_tokens = seq.num_tokens
            self.bm.cache_full_blocks(seq)
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow(self, data):
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(data.draw(st.integers(0, 5)))
        if self.bm.allocate(seq, 1):
            seq.num_computed_tokens += 1
            self.bm.cache_full_blocks(seq)
        else:
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free_sequence(seq)

    @invariant()
    def accounting(self):
        owners: dict[int, int] = {}
        for seq in self.live:
            assert len(seq.block_table) == -(-seq.num_tokens // 4)
            for b in seq.block_table:
                owners[b] = owners.get(b, 0) + 1
        for block in self.bm.blocks:
            assert block.ref_count == owners.get(block.block_id, 0)
            assert (block.ref_count == 0) == (block.block_id in self.bm.free or block.block_id in self.bm.fresh
                                              or block.block_id in self.bm.plain)
        for h, b in self.bm.cached.items():
            assert self.bm.blocks[b].hash == h

    def teardown(self):
        for seq in self.live:
            self.bm.free_sequence(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
