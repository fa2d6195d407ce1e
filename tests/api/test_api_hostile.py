"""Hostile inputs (issue 16): random JSON of the right and the wrong shapes, and non-JSON bodies, sent to every route
of a real server (uvicorn on a socket, dummy model) while real requests run beside them. Property: never a 5xx,
never a hang (every answer within the client timeout), every error in OpenAI's shape, the real requests finish
normally with all their tokens, and every KV block is back at the end. Bounded (`max_examples`) to stay near a minute
on two cores."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.servers import ThreadServer, make_app, make_engine, wait_until

POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/summarize", "/v1/classify", "/tokenize", "/detokenize"]
GET_ROUTES = ["/v1/models", "/health", "/ready", "/metrics", "/version"]

# -- values ---------------------------------------------------------------------------------------------------------
ints = st.one_of(st.integers(-3, 24), st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30)]))
floats = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e-50, 1e308, -1e308, float("inf"), float("nan")]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "🚀", "\x00", "<|im_end|>", "a" * 3000]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", ""]),
                                    "content": st.one_of(texts, anything)}), max_size=3),
    anything)
labels = st.one_of(st.lists(texts, max_size=4), anything)
token_ids = st.one_of(st.lists(ints, max_size=6), st.lists(st.booleans(), max_size=3), anything)

FIELDS = {  # the fields each route knows, each with values of the right type and of wrong ones
    "model": st.one_of(st.just("dummy:tiny"), texts, anything),
    "prompt": st.one_of(texts, st.lists(texts, max_size=3), token_ids, anything),
    "messages": messages,
    "input": st.one_of(texts, st.lists(texts, max_size=3), anything),
    "labels": labels,
    "tokens": token_ids,
    "max_tokens": ints, "n": ints, "top_k": ints, "seed": ints, "logprobs": st.one_of(st.booleans(), ints, anything),
    "top_logprobs": ints, "temperature": floats, "top_p": floats, "presence_penalty": floats,
    "frequency_penalty": floats, "repetition_penalty": floats, "timeout": floats, "priority": ints,
    "stream": st.one_of(st.booleans(), anything), "echo": st.one_of(st.booleans(), anything),
    "stop": st.one_of(texts, st.lists(texts, max_size=3), anything),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(texts, ints.map(str)), floats, max_size=3), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "ignore_eos": st.booleans(), "multi_label": st.one_of(st.booleans(), anything),
    "permutations": ints, "add_special_tokens": st.one_of(st.booleans(), anything),
}
right_shape = st.fixed_dictionaries({}, optional=FIELDS)
bodies = st.one_of(right_shape, anything)
raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"[]", b"null", b'{"prompt": "\xff"}',
                                                                b'{"a":' * 2000]))


# -- the server, and real traffic beside the hostile one ------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server(dummy_lm):
    engine = make_engine(dummy_lm, max_model_len=512, num_kv_blocks=256, max_num_seqs=16)
    app = make_app(engine, summarize_max_input_chars=20000)
    with ThreadServer(app) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()


class RealTraffic:
    """Streams and plain requests sent one after another on a thread while the hostile ones arrive."""

    def __init__(self, url: str):
        self.url, self.results, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                body = {"prompt": f"Real request {i}", "max_tokens": 24, "ignore_eos": True, "temperature": 0.7}
                if i % 2:
                    self.results.append(self._stream(c, body))
                else:
                    r = c.post("/v1/completions", json=body)
                    choice = r.json()["choices"][0] if r.status_code == 200 else {}
                    self.results.append((r.status_code, choice.get("finish_reason"),
                                         r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0))
                i += 1

    @staticmethod
    def _stream(c: httpx.Client, body: dict) -> tuple:
        tokens, finish, status = 0, None, None
        with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):
                        return status, "error", 0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
        return status, finish, tokens


@pytest.fixture(scope="module")
def traffic(hostile_server):
    t = RealTraffic(hostile_server.url)
    t.thread.start()
    yield t
    t.stop.set()
    t.thread.join(60)


@pytest.fixture(scope="module")
def client(hostile_server):
    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        yield c


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body


def send(client: httpx.Client, path: str, content: bytes) -> None:
    started = time.monotonic()
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        r.read()  # a stream is read to its end: it must end, within the client's timeout
    check(r)
    assert time.monotonic() - started < 30


HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("path", POST_ROUTES)
@HYPOTHESIS
@given(body=bodies)
def test_random_json_never_5xx(client, traffic, path, body):
    send(client, path, json.dumps(body, allow_nan=True).encode())


@pytest.mark.parametrize("path", POST_ROUTES)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=raw_bodies)
def test_raw_bytes_never_5xx(client, traffic, path, content):
    send(client, path, content)


@pytest.mark.parametrize("path", GET_ROUTES)
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3), body=st.binary(max_size=32))
def test_get_routes_with_junk_never_5xx(client, traffic, path, query, body):
    check(client.request("GET", path, params=query, content=body))


def test_real_requests_unharmed_and_every_block_back(hostile_server, traffic):
    """Runs last in this module: the traffic that ran beside the hostile requests finished normally."""
    traffic.stop.set()
    traffic.thread.join(60)
    assert len(traffic.results) >= 4, traffic.results
    assert all(r == (200, "length", 24) for r in traffic.results), traffic.results
    engine = hostile_server.engine
    assert wait_until(lambda: (s := engine.stats()).running == 0 and s.waiting == 0
                      and s.free_blocks == s.num_blocks, timeout=30), engine.stats()
    metrics = httpx.get(hostile_server.url + "/metrics", timeout=10).text
    assert "loom_kv_cache_usage_ratio 0.0" in metrics
    assert 'status="500"' not in metrics and engine.healthy
