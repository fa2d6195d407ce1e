"""The encoder batcher inside AsyncEngine: batches respect the token budget, requests from several callers share
batches, and while sequences decode the engine alternates one decode step with one encoder batch (so an embedding
burst delays a running stream by at most one batch per token)."""
from __future__ import annotations

import asyncio

import pytest

from server.engine import EncoderBatcher, InvalidRequestError, RequestTimeoutError, SamplingParams
from tests.support.servers import make_engine


@pytest.fixture(scope="module")
def engine(dummy_lm, minilm_fp32):
    engine = make_engine(dummy_lm, encoders=EncoderBatcher({"mini": minilm_fp32}, max_batch_tokens=64))
    yield engine
    engine.shutdown()


def test_budget_sharing_and_interleaving_with_decode(engine, minilm_fp32):
    events: list[tuple] = []
    engine.add_step_observer(lambda s: events.append(("step", s.num_seqs)))
    engine.add_encode_observer(lambda b: events.append(("encode", b.num_seqs, b.num_tokens)))
    texts = [minilm_fp32.encode_texts([f"text {i} " * (1 + i % 5)])[0] for i in range(40)]

    async def main():
        async def stream():
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
            return [o async for o in engine.generate([1, 2, 3, 4], params)]

        gen = asyncio.ensure_future(stream())
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*(engine.encode("mini", texts[i::4]) for i in range(4)))
        await gen
        return results

    results = asyncio.run(main())
    assert [len(r) for r in results] == [10, 10, 10, 10] and all(len(row) == 384 for r in results for row in r)
    batches = [e for e in events if e[0] == "encode"]
    assert sum(b[1] for b in batches) == 40
    assert all(b[2] <= 64 or b[1] == 1 for b in batches)  # the budget, or one sequence alone
    assert max(b[1] for b in batches) > 2  # sequences of different requests shared a batch
    # While the stream still decodes (up to its last step), no two encoder batches run back to back; once it has
    # finished the batcher may run batches in a row.
    kinds = [e[0] for e in events]
    last_step = len(kinds) - 1 - kinds[::-1].index("step")
    while_decoding = kinds[kinds.index("encode"):last_step + 1]
    assert "encode" in while_decoding  # the burst did overlap the stream
    assert all(not (a == b == "encode") for a, b in zip(while_decoding, while_decoding[1:])), while_decoding


def test_refusals_and_deadline(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await engine.encode("mini", [[101, 99999, 102]])
        with pytest.raises(InvalidRequestError, match="maximum input length is 256"):
            await engine.encode("mini", [[101] * 257])
        with pytest.raises(InvalidRequestError, match="no encoder model 'other'"):
            await engine.encode("other", [[101, 102]])
        import time
        with pytest.raises(RequestTimeoutError):
            await engine.encode("mini", [[101, 2000, 102]] * 50, deadline=time.monotonic() - 1)
        assert await engine.encode("mini", [[101, 2000, 102]])  # the engine carries on

    asyncio.run(main())


def test_a_batch_while_decoding_is_held_to_about_one_step(minilm_fp32):
    """While sequences decode, the engine asks for a batch that takes about one decode step: the token budget comes
    from the encoder's measured tokens/s, and a batch still takes at least one sequence."""
    from server.engine.encoder import EncodeJob
    batcher = EncoderBatcher({"mini": minilm_fp32}, max_batch_tokens=64)
    assert batcher.budget_for(0.01) == 64  # no rate measured yet: the whole budget
    batcher.tokens_per_second["mini"] = 2000.0
    assert (batcher.budget_for(0.01), batcher.budget_for(1.0), batcher.budget_for(0.0)) == (20, 64, 1)
    sizes, answers = [], []
    batcher.observers.append(lambda b: sizes.append((b.num_seqs, b.num_tokens)))
    batcher.add(EncodeJob("r", "mini", [[101] + [2000 + i] * 6 + [102] for i in range(5)], None, answers.append))
    for budget in (20, 1, None):
        batcher.step(budget)
    assert sizes == [(2, 16), (1, 8), (2, 16)]
    assert len(answers) == 1 and len(answers[0]) == 5 and not batcher.has_work()
    assert batcher.tokens_per_second["mini"] != 2000.0  # each batch updates the moving average
