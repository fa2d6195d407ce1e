"""AsyncEngine on a tiny random model: streaming deltas, abort frees blocks at once, a failing step fails only its
requests, a dead engine fails callers instead of hanging them, the waiting queue is bounded."""
import asyncio
import contextvars
import time

import pytest

from server.engine import (
    AsyncEngine,
    EngineCore,
    EngineDeadError,
    EngineSettings,
    InternalEngineError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
)
from server.model import ModelSettings, load_model


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model(ModelSettings(model="dummy:tiny", dtype="float32"), progress=False)


@pytest.fixture
def engine(tiny_lm):
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01)))
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params):
    return [out async for out in engine.generate(prompt, params)]


def all_blocks_free(engine) -> bool:
    s = engine.stats()
    return s.free_blocks == s.num_blocks and s.running == 0 and s.waiting == 0


async def wait_until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_streams_deltas_until_finished(engine):
    outs = asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert sum(len(o.token_ids) for o in outs) == 12 and outs[-1].num_output_tokens == 12
    assert all_blocks_free(engine)


def test_concurrent_requests_and_n(engine):
    async def main():
        params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=1, ignore_eos=True)
        results = await asyncio.gather(*(collect(engine, [i + 3] * (i + 1), params) for i in range(10)))
        for outs in results:
            assert sorted(o.index for o in outs if o.finished) == [0, 1, 2]
    asyncio.run(main())
    assert all_blocks_free(engine)


def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    async def main():
        stream = engine.generate([3, 4, 5], SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
        async for _ in stream:
            assert engine.stats().running == 1
            break
        await stream.aclose()  # what a disconnecting client does
        await wait_until(lambda: all_blocks_free(engine))
    asyncio.run(main())


def test_invalid_request_raises_before_queueing(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="maximum context length"):
            await collect(engine, [3] * 10, SamplingParams(max_tokens=10 ** 6))
    asyncio.run(main())


def test_failing_step_fails_its_requests_and_engine_survives(engine, monkeypatch):
    runner = engine.core.runner
    real_run = runner.run
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_run(sched)

    monkeypatch.setattr(runner, "run", flaky)

    async def main():
        with pytest.raises(InternalEngineError, match="RuntimeError: boom"):
            await collect(engine, [3, 4], SamplingParams(max_tokens=4, temperature=0))
        outs = await collect(engine, [3, 4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert outs[-1].finish_reason == "length"
    asyncio.run(main())
    assert engine.healthy and all_blocks_free(engine)


def test_a_request_that_breaks_sampling_fails_alone(engine, monkeypatch):
    """Sampling parameters that break the batched sampler fail their own request only: the batch is sampled again
    row by row, and the other streams in the same steps finish normally."""
    sampler = engine.core.sampler
    real_call = type(sampler).__call__

    def fragile(self, logits, seqs, *drafts):
        if any(s.params.top_k == 12345 for s in seqs):
            raise OverflowError("Overflow when unpacking long long")
        return real_call(self, logits, seqs, *drafts)

    monkeypatch.setattr(type(sampler), "__call__", fragile)
    good = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def main():
        streams = [engine.generate([3 + i, 4, 5], good) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]  # all three are running
        with pytest.raises(InternalEngineError, match="sampling failed: OverflowError"):
            await collect(engine, [9, 9], SamplingParams(max_tokens=4, temperature=1.0, top_k=12345))
        for first, stream in zip(firsts, streams):
            rest = [out async for out in stream]
            assert rest[-1].finish_reason == "length"
            assert len(first.token_ids) + sum(len(o.token_ids) for o in rest) == 24
    asyncio.run(main())
    assert engine.healthy and all_blocks_free(engine)


def test_fatal_error_marks_unhealthy_and_fails_callers(engine, monkeypatch):
    def fatal():
        raise SystemError("engine thread lost")

    async def main():
        stream = engine.generate([3, 4], SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
        first = await stream.__anext__()
        assert first.token_ids
        monkeypatch.setattr(engine.core, "step", fatal)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        await wait_until(lambda: not engine.healthy)
        with pytest.raises(EngineDeadError):
            await collect(engine, [3], SamplingParams(max_tokens=1))
    monkeypatch.setattr(engine.core, "step", engine.core.step)
    asyncio.run(main())


def test_queue_full(tiny_lm):
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01, max_num_seqs=1)), max_waiting=1)
    try:
        async def main():
            long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
            first = eng.generate([3], long)
            await first.__anext__()
            second = eng.generate([4], long)
            task = asyncio.ensure_future(second.__anext__())
            await wait_until(lambda: eng.stats().waiting == 1)
            with pytest.raises(QueueFullError):
                await collect(eng, [5], long)
            task.cancel()
            await first.aclose()
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_deadlines_abort_running_and_waiting_requests(tiny_lm, monkeypatch):
    """A deadline is enforced on the engine thread, queue time included: a request still waiting for a slot and one
    running both end with RequestTimeoutError at their deadlines, their blocks freed; others carry on."""
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01, max_num_seqs=1)))
    real_run = eng.core.runner.run
    monkeypatch.setattr(eng.core.runner, "run", lambda sched: (time.sleep(0.005), real_run(sched))[1])
    long = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    try:
        async def main():
            started = time.monotonic()
            running = eng.generate([3], long, deadline=started + 0.6)
            await running.__anext__()
            with pytest.raises(RequestTimeoutError):  # never gets the only slot
                async for _ in eng.generate([4], long, deadline=started + 0.3):
                    pass
            assert 0.3 <= time.monotonic() - started < 0.6
            with pytest.raises(RequestTimeoutError):
                async for _ in running:
                    pass
            assert 0.6 <= time.monotonic() - started < 1.2
            outs = [o async for o in eng.generate([5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]
            assert outs[-1].finish_reason == "length"
        asyncio.run(main())
        assert eng.healthy and all_blocks_free(eng)
    finally:
        eng.shutdown()


def test_drain_rate_estimates_retry_after():
    from server.engine.admission import DrainRate
    rate = DrainRate(window=10.0)
    assert rate.seconds_to_drain(1, 0) is None  # nothing measured yet
    rate.record(100.0, admitted=0, prefilled=0)
    rate.record(102.0, admitted=4, prefilled=1000)  # 2 sequences / s, 500 tokens / s
    assert rate.seconds_to_drain(6, 0) == 3 and rate.seconds_to_drain(0, 2600) == 6
    assert rate.seconds_to_drain(1, 0) == 1  # at least a second
    rate.record(200.0, admitted=4, prefilled=1000)  # old samples leave the window: nothing drains now
    assert rate.seconds_to_drain(1, 0) is None


def test_queue_cap_holds_under_a_burst_during_a_long_step(tiny_lm, monkeypatch):
    """60 concurrent submissions while the engine is inside one long step: exactly max_waiting are accepted beyond
    the running one, the rest are refused; the token cap refuses by prompt tokens the same way."""
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01, max_num_seqs=1, max_waiting=8)))
    real_run = eng.core.runner.run
    in_step = {"slow": False}

    def run(sched):
        if in_step["slow"]:
            time.sleep(0.5)
        return real_run(sched)

    monkeypatch.setattr(eng.core.runner, "run", run)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    try:
        async def main():
            hog = eng.generate([3], long)
            await hog.__anext__()
            in_step["slow"] = True  # from now on every step takes 0.5 s: the burst lands inside one

            async def first(stream):
                return await stream.__anext__()

            streams = [eng.generate([4 + i], long) for i in range(60)]
            results = await asyncio.gather(*(asyncio.wait_for(first(s), 0.2) for s in streams),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, QueueFullError)]
            accepted = [r for r in results if isinstance(r, asyncio.TimeoutError)]  # queued, no token yet
            assert len(accepted) == 8 and len(refused) == 52, (len(accepted), len(refused))
            for s in streams:
                await s.aclose()
            await hog.aclose()
        asyncio.run(main())
        in_step["slow"] = False
        assert wait_until_sync(lambda: all_blocks_free(eng))
    finally:
        eng.shutdown()


def test_token_cap_refuses_by_prompt_tokens(tiny_lm):
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01, max_num_seqs=1, max_waiting=0,
                                                         max_waiting_tokens=100)))
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    try:
        async def main():
            hog = eng.generate([3], long)
            await hog.__anext__()  # running; nothing waits
            big = eng.generate(list(range(3, 153)), long)  # 150 tokens into an empty queue: admitted
            task = asyncio.ensure_future(big.__anext__())
            await wait_until(lambda: eng.stats().waiting == 1)
            with pytest.raises(QueueFullError, match="150 prompt tokens waiting, limit 100"):
                await collect(eng, [5, 6], long)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await big.aclose()
            await hog.aclose()
        asyncio.run(main())
        assert wait_until_sync(lambda: all_blocks_free(eng))
    finally:
        eng.shutdown()


def wait_until_sync(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_a_short_request_finishes_while_a_long_prompt_prefills(tiny_lm):
    """A 4-token request that arrives while a 1,800-token prompt prefills is done before that prompt's first token."""
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.05, max_num_batched_tokens=2048,
                                                         max_prefill_chunk=64)))
    try:
        async def main():
            order = []

            async def run(name, prompt, max_tokens):
                params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
                async for out in eng.generate(prompt, params):
                    if out.token_ids and name not in order:
                        order.append(name)
                return name

            long = asyncio.ensure_future(run("long", list(range(3, 1803)), 2))
            await wait_until(lambda: eng.stats().running == 1)
            await asyncio.gather(long, run("short", [5, 6, 7, 8], 4))
            assert order == ["short", "long"]
        asyncio.run(main())
        assert all_blocks_free(eng)
    finally:
        eng.shutdown()


def test_a_task_takes_one_slot_and_its_requests_skip_the_cap():
    from server.engine.admission import Admission
    admission = Admission(max_waiting=2, max_waiting_tokens=0)
    outside = contextvars.Context()  # a plain request from another client: not part of the task
    with admission.task():
        assert admission.queued() == (1, 0)
        for _ in range(3):  # the first takes over the task's slot, the rest are past the cap but part of the task
            admission.admit(1, 10)
        assert admission.queued() == (3, 30)
        with pytest.raises(QueueFullError, match="3 sequences waiting, limit 2"):
            outside.run(admission.admit, 1, 5)
        with pytest.raises(QueueFullError):  # a second task is refused whole
            outside.run(lambda: admission.task().__enter__())
    assert admission.queued() == (3, 30)  # its requests still wait; the slot was handed over, not freed twice
    with admission.entering_scheduler(3, 30):
        pass
    admission.count_scheduler(0, 0, now=1.0, admitted=3, prefilled=30)
    with admission.task():  # a task that never sends a request gives its slot back
        assert admission.queued() == (1, 0)
    assert admission.queued() == (0, 0)


def test_heap_is_trimmed_after_big_steps_and_when_idle(tiny_lm, monkeypatch):
    """A busy server never goes idle, so the freed temporaries of prefill steps would pile up in the heap: the loop
    trims after a step of at least TRIM_STEP_TOKENS (at most once per TRIM_INTERVAL_S), never after decodes, and
    once on going idle."""
    import server.engine.engine_loop as engine_loop
    import server.engine.step_hooks as step_hooks
    trims: list[int] = []
    monkeypatch.setattr(engine_loop, "trim_heap", lambda: trims.append(eng.core.last_step_tokens))
    monkeypatch.setattr(step_hooks, "TRIM_STEP_TOKENS", 64)
    eng = AsyncEngine(EngineCore(tiny_lm, EngineSettings(kv_cache_memory=0.01, max_num_batched_tokens=256,
                                                         speculative="none")))  # one-row decode steps
    try:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        asyncio.run(collect(eng, list(range(5, 105)), params))  # one 100-token prefill step, then 19 decodes
        assert wait_until_sync(lambda: len(trims) == 2)
        # after the prefill step, none after the 19 one-token decodes, then one on going idle (the last step was one)
        assert trims == [100, 1]
    finally:
        eng.shutdown()

