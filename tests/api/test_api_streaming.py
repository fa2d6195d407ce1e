"""Streaming over real sockets (uvicorn in a thread, dummy model): a client that disconnects mid-stream aborts its
sequence at once and its KV blocks come back; many concurrent streams all complete; /metrics agrees."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.support.servers import ThreadServer, make_app, make_engine, sse_chunks, wait_until


@pytest.fixture(scope="module")
def server(dummy_lm):
    engine = make_engine(dummy_lm, max_model_len=2048, num_kv_blocks=512)
    with ThreadServer(make_app(engine)) as s:
        s.engine = engine
        yield s
    engine.shutdown()


def metric(text: str, name: str, labels: str = "", default: float | None = None) -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    if m is None and default is not None:
        return default
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def all_blocks_free(engine) -> bool:
    s = engine.stats()
    return s.running == 0 and s.waiting == 0 and s.free_blocks == s.num_blocks


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go on"}]}),
    ("/v1/completions", {"prompt": "go on"}),
])
def test_disconnect_aborts_and_frees_kv_blocks(server, path, body):
    engine = server.engine
    endpoint = "chat" if "chat" in path else "completions"
    aborted = f'{{endpoint="{endpoint}",finish_reason="abort",model="dummy:tiny"}}'
    before = metric(httpx.get(server.url + "/metrics").text, "loom_requests_total", aborted, default=0.0)
    tokens_before = engine.stats().generation_tokens
    body = {**body, "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        seen = 0
        lines = r.iter_lines()  # held, so breaking out does not close the connection yet
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 4:
                break
        assert engine.stats().running == 1, "the request should still be generating"
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: all_blocks_free(engine), timeout=10), engine.stats()
    s = engine.stats()
    assert s.free_blocks == s.num_blocks and s.kv_usage == 0.0
    assert s.generation_tokens - tokens_before < 1000, "generation went on after the client left"
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "loom_requests_total", aborted) == before + 1


def test_concurrent_streams_complete(server):
    n = 24

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, str]:
        body = {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 16, "temperature": 1.0,
                "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        text, finish, usage = "", None, None
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for chunk in sse_chunks(r):
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                    finish = chunk["choices"][0]["finish_reason"] or finish
                else:
                    usage = chunk["usage"]
        assert usage is not None and usage["completion_tokens"] <= 16
        return text, finish

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    results = asyncio.run(run())
    assert len(results) == n and all(f in ("stop", "length") for _, f in results)
    assert wait_until(lambda: all_blocks_free(server.engine))
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "loom_num_requests_running") == 0 and metric(text, "loom_kv_cache_usage_ratio") == 0
    assert metric(text, "loom_time_to_first_token_seconds_count", '{model="dummy:tiny"}') >= n
    assert metric(text, "loom_batch_size_count") > 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 2000}),
    ("/v1/summarize", {"input": "A long text. " * 200, "max_tokens": 1000, "chunk_tokens": 64}),
])
def test_disconnect_cancels_non_streamed_requests(server, path, body):
    """A client that gives up on a plain (non-streamed) request also stops its work."""
    engine = server.engine
    endpoint = path.split("/")[-1].replace("completions", "chat")
    aborted = f'{{endpoint="{endpoint}",finish_reason="abort",model="dummy:tiny"}}'
    before = metric(httpx.get(server.url + "/metrics").text, "loom_requests_total", aborted, default=0.0)
    body = {**body, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + path, json=body, timeout=httpx.Timeout(10, read=0.5))
    assert wait_until(lambda: all_blocks_free(engine), timeout=10), engine.stats()
    assert metric(httpx.get(server.url + "/metrics").text, "loom_requests_total", aborted) >= before + 1
