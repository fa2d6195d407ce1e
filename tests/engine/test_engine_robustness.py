"""One request cannot take the engine down: whatever its submission raises on the engine thread fails that request
alone (nothing of it is left behind in the scheduler, the output processor or the queue counts) and the next
request is served. A caller that leaves an encoder request has its sequences dropped before they run."""
import asyncio
import threading

import pytest

from server.engine import AsyncEngine, EncoderBatcher, EngineCore, EngineSettings, InternalEngineError, SamplingParams
from server.engine.sequence import Sequence
from tests.support.servers import make_engine


@pytest.fixture
def engine(dummy_lm):
    eng = AsyncEngine(EngineCore(dummy_lm, EngineSettings(kv_cache_memory=0.01)))
    yield eng
    eng.shutdown()


async def run(engine, prompt, params, **kwargs):
    """The request's deltas; a request the engine forgot fails the test instead of hanging it."""
    async def outputs():
        return [out async for out in engine.generate(prompt, params, **kwargs)]
    return await asyncio.wait_for(outputs(), 60)


def assert_nothing_left(engine) -> None:
    s = engine.stats()
    assert (s.running, s.waiting, s.free_blocks) == (0, 0, s.num_blocks)
    assert not engine.core.requests and not engine.core.processor.states
    assert engine.admission.queued() == (0, 0)


def test_a_priority_too_large_for_a_float_fails_its_request_only(engine):
    """The scheduler orders waiting sequences by arrival time + priority * seconds; a priority of 310 digits cannot
    be turned into a float (OverflowError on the engine thread). That request fails; the engine serves on."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def main():
        for priority in (10 ** 310, -10 ** 310):
            with pytest.raises(InternalEngineError, match="OverflowError"):
                await run(engine, [3, 4, 5], params, priority=priority)
        outs = await run(engine, [3, 4, 5], params)
        assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 4

    asyncio.run(main())
    assert engine.healthy
    assert_nothing_left(engine)


async def collect_rest(stream):
    return [out async for out in stream]


def test_a_submission_that_raises_midway_is_undone_and_fails_alone(engine, monkeypatch):
    """The second of a request's n sequences breaks the scheduler while the first already waits there: the request
    is taken out whole, its caller gets the error, and requests before and after it run to the end."""
    real_key = Sequence.sort_key

    def sort_key(seq):
        if seq.request_id == "bad" and seq.index == 1:
            raise ValueError("scheduler bug")
        return real_key(seq)

    monkeypatch.setattr(Sequence, "sort_key", sort_key)
    long = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def main():
        running = engine.generate([7, 8, 9], long)
        first = await running.__anext__()
        with pytest.raises(InternalEngineError, match="ValueError: scheduler bug"):
            await run(engine, [3, 4], SamplingParams(max_tokens=4, temperature=1.0, n=2), request_id="bad")
        rest = await asyncio.wait_for(collect_rest(running), 60)
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(o.token_ids) for o in rest) == 24
        after = await run(engine, [3, 4], SamplingParams(max_tokens=4, temperature=1.0, n=2), request_id="good")
        assert sorted(o.index for o in after if o.finished) == [0, 1]

    asyncio.run(main())
    assert engine.healthy
    assert_nothing_left(engine)


def test_cancelled_encode_is_dropped_before_it_runs(dummy_lm, minilm_fp32, monkeypatch):
    """A client that leaves an embeddings request cancels the awaiting task, which cancels the awaited future too;
    the engine must still be told, so the request's sequences are dropped at the next batch instead of run."""
    batcher = EncoderBatcher({"mini": minilm_fp32}, max_batch_tokens=64)
    engine = make_engine(dummy_lm, encoders=batcher)
    gate, busy, ran = threading.Event(), threading.Event(), []
    real_run_batch = batcher.run_batch

    def gated(enc, inputs):  # the first batch holds the engine thread until the test has cancelled
        busy.set()
        assert gate.wait(30)
        ran.append(len(inputs))
        return real_run_batch(enc, inputs)

    monkeypatch.setattr(batcher, "run_batch", gated)

    async def main():
        first = asyncio.ensure_future(engine.encode("mini", [[101, 2000, 102]]))
        assert await asyncio.to_thread(busy.wait, 30)
        left = asyncio.ensure_future(engine.encode("mini", [[101, 2001, 102]] * 3, request_id="left"))
        await asyncio.sleep(0)  # its job is in the engine's inbox
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        last = asyncio.ensure_future(engine.encode("mini", [[101, 2002, 102]]))  # queued behind it
        await asyncio.sleep(0)
        gate.set()
        assert [len(rows) for rows in await asyncio.wait_for(asyncio.gather(first, last), 60)] == [1, 1]

    try:
        asyncio.run(main())
        # `last` was queued behind the cancelled request: had it not been dropped, its 3 sequences ran before `last`
        assert ran == [1, 1], ran
        assert not batcher.jobs and not any(batcher.queues.values())
        assert engine.healthy
    finally:
        engine.shutdown()
