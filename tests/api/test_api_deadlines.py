"""Deadlines (`timeout`) that expire while prompts are still being prefilled: `n = 2` completions and chats, streamed
and not, and a summarize split into several chunks. Each answers 504 (or an SSE error event then [DONE]) and frees
every block (issue 14, Must show)."""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from tests.support.servers import engine_idle, make_app, make_engine, wait_ready, wait_until

PROMPT = " ".join(["threads"] * 300)  # ~300 tokens: 19 prefill chunks of 16 tokens for each sequence


@pytest.fixture
def prefill_engine(dummy_lm, monkeypatch):
    """Prefill is slow (16-token chunks, 30 ms per step with a prefill in it): a 300-token prompt takes > 0.5 s to
    prefill, so a 0.25 s deadline expires in the middle of it. Steps are recorded as (prefills, decodes)."""
    engine = make_engine(dummy_lm, max_prefill_chunk=16, max_num_batched_tokens=32)
    real_run = engine.core.runner.run
    engine.steps = []

    def slow_run(sched):
        engine.steps.append((len(sched.prefills), len(sched.decodes)))
        if sched.prefills:
            time.sleep(0.03)
        return real_run(sched)

    monkeypatch.setattr(engine.core.runner, "run", slow_run)
    yield engine
    engine.shutdown()


def no_decode_ran(engine) -> bool:
    return all(decodes == 0 for _, decodes in engine.steps)


COMPLETION = {"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True, "temperature": 0.8, "n": 2, "timeout": 0.25}
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 50, "ignore_eos": True, "n": 2,
        "timeout": 0.25}


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_n2_deadline_during_prefill_is_504_and_frees_both(prefill_engine, path, body):
    with TestClient(make_app(prefill_engine)) as c:
        wait_ready(c.get)
        prefill_engine.steps.clear()
        started = time.monotonic()
        r = c.post(path, json=body)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 2.0
        assert prefill_engine.steps and no_decode_ran(prefill_engine), "the deadline came during prefill"
        assert wait_until(lambda: engine_idle(prefill_engine)), "both sequences of n=2 freed every block"


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_n2_streamed_deadline_during_prefill_is_504_and_frees_both(prefill_engine, path, body):
    """A stream's status is decided before its first byte (server/api/streaming.py `prime`): a deadline that expires
    before any token answers a plain 504, not a 200 stream holding only an error event."""
    with TestClient(make_app(prefill_engine)) as c:
        wait_ready(c.get)
        prefill_engine.steps.clear()
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            r.read()
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert r.json()["error"]["type"] == "timeout_error"
        assert prefill_engine.steps and no_decode_ran(prefill_engine), "the deadline came during prefill"
        assert wait_until(lambda: engine_idle(prefill_engine)), "both sequences of n=2 freed every block"


def test_n2_stream_deadline_after_the_first_tokens_is_an_error_event(prefill_engine):
    """Once tokens have gone out, the same deadline ends the stream with an error event and [DONE]."""
    with TestClient(make_app(prefill_engine)) as c:
        wait_ready(c.get)
        body = {"prompt": "short", "max_tokens": 400, "ignore_eos": True, "n": 2, "stream": True, "timeout": 1.0}
        real_run = prefill_engine.core.runner.run
        prefill_engine.core.runner.run = lambda sched: (time.sleep(0.01), real_run(sched))[1]
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        indexes = {c["index"] for line in lines[:-2] for c in json.loads(line[6:]).get("choices", [])}
        assert indexes == {0, 1}
        assert wait_until(lambda: engine_idle(prefill_engine))


@pytest.mark.parametrize("stream", [False, True])
def test_summarize_of_several_chunks_times_out_during_prefill_and_frees_every_chunk(prefill_engine, stream):
    document = " ".join(f"Paragraph {i}: the loom weaves threads into cloth, row after row." for i in range(40))
    with TestClient(make_app(prefill_engine, summarize_chunk_tokens=128)) as c:
        wait_ready(c.get)
        chunks = c.app.state.lifecycle.model.summarizer
        prefill_engine.steps.clear()
        submitted = []
        real_generate = prefill_engine.generate

        def counting_generate(*args, **kwargs):
            submitted.append(kwargs.get("request_id"))
            return real_generate(*args, **kwargs)

        prefill_engine.generate = counting_generate
        try:
            body = {"input": document, "max_tokens": 40, "timeout": 0.25, "stream": stream}
            with c.stream("POST", "/v1/summarize", json=body) as r:
                r.read()
            # nothing was generated yet, so streamed or not the answer is a 504 (see the n=2 streamed test)
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        finally:
            prefill_engine.generate = real_generate
        assert chunks is not None and len(submitted) >= 2, f"the document went out in several chunks: {submitted}"
        assert no_decode_ran(prefill_engine), "the deadline came while the chunks were prefilling"
        assert wait_until(lambda: engine_idle(prefill_engine)), "every chunk's sequence was aborted and freed"
