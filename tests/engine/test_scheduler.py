"""Scheduler properties under random arrivals, aborts and finishes (hypothesis): budgets are never exceeded, no
block leaks, reference counts return to zero, and every request finishes or is aborted (no deadlock)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler
from tests.support.models import compute_scheduled, make_seq

BLOCK = 4


def simulate(num_blocks, max_seqs, max_tokens_per_step, requests, abort_every, steps_limit=2000):
    bm = BlockManager(num_blocks, BLOCK)
    sched = Scheduler(bm, max_seqs, max_tokens_per_step)
    pending = list(requests)  # (arrival step, prompt, max new tokens, priority)
    done, aborted, step = set(), set(), 0
    live = {}
    while (pending or sched.has_work) and step < steps_limit:
        while pending and pending[0][0] <= step:
            _, prompt, max_new, prio = pending.pop(0)
            seq = make_seq(prompt, len(live) + len(done) + len(aborted))
            seq.max_tokens, seq.priority = max_new, prio
            live[seq.seq_id] = seq
            sched.add(seq)
        out = sched.schedule()
        assert out.num_tokens <= max_tokens_per_step
        assert len(out.prefills) + len(out.decodes) <= max_seqs
        assert len(sched.running) <= max_seqs
        assert len({s.seq.seq_id for s in out.prefills + out.decodes}) == len(out.prefills) + len(out.decodes)
        for seq in compute_scheduled(sched, out, BLOCK):
            done.add(seq.seq_id)
            del live[seq.seq_id]
        if abort_every and step % abort_every == abort_every - 1 and live:
            victim = live.pop(min(live))
            sched.finish(victim, "abort")
            aborted.add(victim.seq_id)
        step += 1
    assert step < steps_limit, "scheduler made no progress (deadlock)"
    assert not live and not sched.running and not sched.waiting
    assert len(done) + len(aborted) == len(requests)
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    return sched


request = st.tuples(st.integers(0, 30), st.lists(st.integers(0, 3), min_size=1, max_size=30),
                    st.integers(1, 12), st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=25), num_blocks=st.integers(11, 40),
       max_seqs=st.integers(1, 8), budget=st.integers(1, 64), abort_every=st.sampled_from([0, 3, 7]))
def test_random_workloads_finish_within_budgets(requests, num_blocks, max_seqs, budget, abort_every):
    # every request fits the pool on its own: prompt (<= 30) + outputs (<= 12) = 42 tokens = 11 blocks
    simulate(num_blocks, max_seqs, budget, sorted(requests, key=lambda r: r[0]), abort_every)


def test_tight_pool_preempts_instead_of_failing():
    reqs = [(0, [1] * 20, 12, 0) for _ in range(6)]
    sched = simulate(num_blocks=12, max_seqs=6, max_tokens_per_step=64, requests=reqs, abort_every=0)
    assert sched.num_preemptions > 0


def test_decodes_go_first_and_long_prompts_are_chunked():
    bm = BlockManager(100, BLOCK)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    short = make_seq([1, 2, 3], 0)
    sched.add(short)
    out = sched.schedule()
    short.num_computed_tokens += 3
    short.token_ids.append(5)
    sched.add(long := make_seq(list(range(50)), 1))
    out = sched.schedule()
    assert [s.seq for s in out.decodes] == [short]
    assert [(s.seq, s.num_new_tokens) for s in out.prefills] == [(long, 15)]


def test_priority_orders_admission():
    bm = BlockManager(100, BLOCK)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    low, high = make_seq([1, 2], 0), make_seq([3, 4], 1)
    low.priority, high.priority = 5, 0
    sched.add(low)
    sched.add(high)
    assert [s.seq for s in sched.schedule().prefills] == [high]


def test_priority_never_starves_a_request():
    """A priority level is worth `priority_step` seconds of waiting: a priority-1 request that has waited longer
    than that goes before a priority-0 one that just arrived."""
    bm = BlockManager(100, BLOCK)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    old, new = make_seq([1, 2], 0), make_seq([3, 4], 1)
    old.priority, new.priority = 1, 0
    old.arrival_time, new.arrival_time = new.arrival_time - 11.0, new.arrival_time
    sched.add(new)
    sched.add(old)
    assert [s.seq for s in sched.schedule().prefills] == [old]
    young = make_seq([5, 6], 2)
    young.priority, young.arrival_time = 1, new.arrival_time - 9.0  # waited less than one step: still behind
    sched.add(young)
    assert sched.waiting == [new, young]


def test_a_long_prompt_takes_a_bounded_share_of_each_step():
    """Stall-free chunked prefill: the long prompt's chunk is capped, so a short prompt that arrives while it
    prefills is scheduled in the very next step, beside it."""
    bm = BlockManager(600, BLOCK)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=64)
    long = make_seq(list(range(3, 3 + 7000 // 20)), 0)
    sched.add(long)
    first = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in first.prefills] == [(long, 64)]
    long.num_computed_tokens += 64
    short = make_seq([5, 6, 7, 8], 1)
    sched.add(short)
    second = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in second.prefills] == [(long, 64), (short, 4)]
