"""BlockManager: allocation, prefix caching, LRU eviction, releasing what slid out of a sliding window, and hypothesis
state machines (with and without a window) that check no block is ever leaked or double-owned and every reference
count returns to zero."""
import pytest
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


def owned_once(bm: BlockManager) -> None:
    """Every block is either free (in exactly one list) or referenced, never both."""
    free = list(bm.free) + bm.plain + bm.fresh
    assert len(free) == len(set(free)) == bm.num_free_blocks
    assert {b.block_id for b in bm.blocks if b.ref_count == 0} == set(free)


def free_all(bm: BlockManager, *seqs: Sequence) -> None:
    """Free `seqs` in order: then every block is back in the pool, each in exactly one free list."""
    for seq in seqs:
        bm.free_sequence(seq)
    assert bm.num_free_blocks == bm.num_blocks and all(blk.ref_count == 0 for blk in bm.blocks)
    owned_once(bm)


@pytest.mark.parametrize("window", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("caching", [True, False])
def test_release_keeps_exactly_the_blocks_the_next_query_can_see(window, caching):
    """After `c` computed tokens the next query sits at position c and sees c - window < j <= c: every block holding
    one of those positions stays, every block wholly before them goes (with prefix caching, never the last registered
    block: the next one's hash chains from it)."""
    for computed in range(1, 30):
        bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=caching, window=window)
        seq = make_seq(list(range(computed + 1)), 0)
        compute(bm, seq, computed)
        table = list(seq.block_table)
        released = bm.release_behind_window(seq)
        first_seen = max(computed + 1 - window, 0)
        assert released * 4 <= first_seen  # no position the next query sees was released
        want = first_seen // 4 if not caching else min(first_seen // 4, computed // 4 - 1)
        assert released == seq.num_released_blocks == max(want, 0), (computed, window)
        assert seq.block_table == table  # entries stay: the kernels index the table by position // block_size
        assert all(bm.blocks[b].ref_count == 0 for b in table[:released])
        assert all(bm.blocks[b].ref_count == 1 for b in table[released:])
        assert bm.release_behind_window(seq) == 0  # nothing is dropped twice
        owned_once(bm)
        bm.free_sequence(seq)
        assert bm.num_free_blocks == 10 and seq.num_released_blocks == 0
        owned_once(bm)


def test_no_window_releases_nothing():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(list(range(30)), 0)
    compute(bm, seq, 30)
    assert bm.release_behind_window(seq) == 0 and bm.num_free_blocks == 2


def test_released_shared_prefix_stays_with_its_other_owner():
    bm = BlockManager(num_blocks=12, block_size=4, window=4)
    a = make_seq(list(range(12)), 0)
    compute(bm, a, 12)
    b = make_seq(list(range(8)) + [50 + i for i in range(12)], 1)
    hits = bm.match_prefix(b)
    assert bm.allocate(b, b.num_tokens - 8, hits) and hits == a.block_table[:2]
    b.num_computed_tokens = b.num_tokens
    bm.cache_full_blocks(b)
    free_before = bm.num_free_blocks
    assert bm.release_behind_window(b) == 4  # positions 0..15; the next query (20) sees 17..20
    assert [bm.blocks[i].ref_count for i in a.block_table] == [1, 1, 1]  # a's blocks live on
    assert bm.num_free_blocks == free_before + 2  # only b's own two blocks went back
    owned_once(bm)
    bm.free_sequence(a)  # now the shared prefix is free, still cached
    assert len(bm.match_prefix(make_seq(list(range(12)), 2))) == 2
    free_all(bm, b)


def test_a_released_prefix_is_found_again_and_reclaimed():
    bm = BlockManager(num_blocks=8, block_size=4, window=4)
    a = make_seq(list(range(17)), 0)
    compute(bm, a, 17)
    bm.release_behind_window(a)
    assert a.num_released_blocks == 3
    b = make_seq(list(range(13)), 1)
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:3]  # a released them, the cache kept them
    assert bm.allocate(b, 1, hits)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1, 1]
    free_all(bm, a, b)


def test_hash_chain_survives_its_released_blocks_being_reused():
    """Released blocks taken by another sequence get its hashes; the sequence's later blocks still chain from its own
    tokens (the last registered block is never released: the next hash is computed from it)."""
    bm = BlockManager(num_blocks=6, block_size=2, window=1)
    a = make_seq(list(range(7)), 0)
    compute(bm, a, 6)
    assert bm.release_behind_window(a) == 2
    n = bm.num_free_blocks
    other = make_seq([90 + i for i in range(2 * n)], 1)
    compute(bm, other, 2 * n)  # every free block: a's released ones are evicted and hashed anew
    bm.free_sequence(other)
    a.token_ids.append(7)
    compute(bm, a, 2)  # tokens 6, 7 fill block 3, hashed from block 2's hash
    parent = None
    for i in range(4):
        parent = bm.block_hash(parent, tuple(range(2 * i, 2 * i + 2)))
    assert bm.blocks[a.block_table[3]].hash == parent
    free_all(bm, a)


def test_release_uncomputed_after_a_release():
    bm = BlockManager(num_blocks=10, block_size=4, window=4)
    a = make_seq(list(range(16)), 0)
    compute(bm, a, 16)
    bm.release_behind_window(a)
    assert bm.allocate(a, 7)  # draft slots for 7 more tokens: two more blocks
    assert len(a.block_table) == 6
    bm.release_uncomputed(a)  # none accepted: back to the four the computed tokens need
    assert len(a.block_table) == 4 and a.num_released_blocks == 3
    free_all(bm, a)


class BlockManagerMachine(RuleBasedStateMachine):
    WINDOW: int | None = None

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4, window=self.WINDOW)
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
            for b in seq.block_table[seq.num_released_blocks:]:  # released entries are stale: owned by no one here
                owners[b] = owners.get(b, 0) + 1
            for i in range(seq.num_released_blocks, seq.num_hashed_blocks):
                assert self.bm.blocks[seq.block_table[i]].token_ids == tuple(seq.token_ids[i * 4:(i + 1) * 4])
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


class WindowedBlockManagerMachine(BlockManagerMachine):
    """The same, with every layer windowed over 5 positions: sequences release what slid out, and are preempted and
    recomputed (free, then admitted again with their prefix hits)."""
    WINDOW = 5

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def slide(self, data):
        seq = data.draw(st.sampled_from(self.live))
        before = seq.num_released_blocks
        self.bm.release_behind_window(seq)
        assert before <= seq.num_released_blocks
        assert seq.num_released_blocks * 4 <= max(seq.num_computed_tokens + 1 - self.WINDOW, 0)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def recompute(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.bm.free_sequence(seq)
        hits = self.bm.match_prefix(seq)
        if self.bm.allocate(seq, seq.num_tokens - len(hits) * 4, hits):
            seq.num_computed_tokens = seq.num_tokens
            self.bm.cache_full_blocks(seq)
        else:
            self.live.remove(seq)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestWindowedBlockManagerMachine = WindowedBlockManagerMachine.TestCase
TestWindowedBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
