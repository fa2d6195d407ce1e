"""Every error path answers OpenAI's shape {"error": {"message", "type", "param", "code"}} with the right status."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api import ServerSettings, create_app
from tests.support.servers import engine_idle, make_app, make_engine, wait_ready, wait_until

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# -- 400: malformed and invalid bodies ------------------------------------------------------------------------------
def test_malformed_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    err = error_of(r, 400)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null"])
def test_non_object_json_is_400(client, body):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    error_of(r, 400)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": [1.5, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),  # booleans are not token ids
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "stream_options": "yes"}, "stream_options"),
    ("/v1/summarize", {"input": "x", "style": "haiku"}, "style"),
    ("/v1/classify", {"input": "x", "labels": []}, "labels"),
])
def test_schema_violations_are_400_not_422(client, path, body, param):
    err = error_of(client.post(path, json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 4, "temperature": 1, "top_k": 10 ** 20}, "top_k"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "logprobs": 1, "echo": "yes"}, "echo"),  # strict booleans: no "yes" -> true
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": ""}, "stop"),  # refused like [""]
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2, "temperature": 0}, "n"),
    ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"50": 1}}, "logit_bias"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt.1"),
    ({"prompt": [10 ** 9]}, "prompt"),
    (b'{"prompt": "caf\\ud800"}', None),  # a lone surrogate: valid JSON, not text
])
def test_bad_completion_parameters_are_400(client, body, param):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    err = error_of(r, 400)
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "x"})])
@pytest.mark.parametrize("priority", [10 ** 310, -(10 ** 310), 2 ** 31, -(2 ** 31) - 1])
def test_priority_beyond_32_bits_is_400_and_the_engine_serves_on(client, path, body, priority):
    """The scheduler turns priority into seconds of waiting, a float: a 310-digit integer used to raise
    OverflowError on the engine thread and stop the engine for good. It is refused at the edge now."""
    err = error_of(client.post(path, json={**body, "priority": priority}), 400)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "priority", None), err
    r = client.post(path, json={**body, "max_tokens": 2, "priority": 2 ** 31 - 1})
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # the field the client sent, not the engine's name
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
])
def test_chat_refusals_name_the_field_sent(client, extra, param):
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
    assert err["param"] == param


def test_response_format_text_is_accepted(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}, "user": "u-1"})
    assert r.status_code == 200, r.text


def test_context_window_error_names_both_numbers(client):
    prompt = [100] * 500  # the dummy engine's window is 512 tokens
    err = error_of(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20}), 400)
    assert "512" in err["message"] and "500" in err["message"] and "20" in err["message"], err
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    err = error_of(client.post("/v1/completions", json={"prompt": [100] * 600, "max_tokens": 1}), 400)
    assert "512" in err["message"] and "600" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000}), 400)
    assert "512" in err["message"] and "5000" in err["message"]


def test_task_errors_are_400(client):
    cases = [("/v1/summarize", {"input": "   "}), ("/v1/summarize", {"input": []}),
             ("/v1/summarize", {"input": "text", "max_tokens": 100000}),
             ("/v1/classify", {"input": "x", "labels": ["a", "a"]}),
             ("/v1/classify", {"input": "x", "labels": ["only"]}),
             ("/v1/classify", {"input": "x", "labels": ["a", "b"], "examples": [{"text": "t", "label": "c"}]}),
             ("/v1/classify", {"input": "x", "labels": ["a", "b"], "label_descriptions": {"c": "?"}}),
             ("/v1/classify", {"input": ["x"] * 200, "labels": [f"l{i}" for i in range(40)]})]
    for path, body in cases:
        error_of(client.post(path, json=body), 400)


# -- 404 / 405 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", CHAT),
                                        ("/v1/summarize", {"input": "x"}),
                                        ("/v1/classify", {"input": "x", "labels": ["a", "b"]})])
def test_unknown_model_is_404(client, path, body):
    err = error_of(client.post(path, json={**body, "model": "gpt-17"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-17" in err["message"]


def test_unknown_route_and_method_in_openai_shape(client):
    error_of(client.get("/v1/nothing-here"), 404)
    error_of(client.get("/v1/completions"), 405)


# -- 413 ------------------------------------------------------------------------------------------------------------
def test_body_over_limit_is_413(dummy_engine):
    with TestClient(make_app(dummy_engine, max_body_bytes=4096)) as c:
        wait_ready(c.get)
        big = {"prompt": "x" * 5000}
        err = error_of(c.post("/v1/completions", json=big), 413)
        assert err["code"] == "request_too_large" and "4096" in err["message"]

        def chunks():  # no Content-Length: counted while it arrives
            for _ in range(10):
                yield b"x" * 1000
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        err = error_of(r, 413)
        assert err["message"].startswith("the request body is larger") and err["code"] == "request_too_large"
        # both refusals are counted, the early one (from Content-Length, before the app) too
        assert 'loom_request_errors_total{status="413"} 2.0' in c.get("/metrics").text
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


# -- 429 ------------------------------------------------------------------------------------------------------------
def test_queue_full_is_429_with_retry_after(dummy_lm):
    engine = make_engine(dummy_lm, max_num_seqs=1, max_waiting=1)
    app = make_app(engine, retry_after=3)

    async def scenario():
        await app.state.lifecycle.warmup()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            long = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
            running = asyncio.create_task(c.post("/v1/completions", json=long))
            assert await asyncio.to_thread(wait_until, lambda: engine.stats().running == 1)
            waiting = asyncio.create_task(c.post("/v1/completions", json=long))
            assert await asyncio.to_thread(wait_until, lambda: engine.stats().waiting == 1)
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            for t in (running, waiting):
                t.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            return r

    try:
        r = asyncio.run(scenario())
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        # estimated from the queue's drain rate: one sequence over the cap, admitted at the rate seen so far
        assert 1 <= int(r.headers["retry-after"]) <= 300
        assert wait_until(lambda: engine.stats().free_blocks == engine.stats().num_blocks)
    finally:
        engine.shutdown()


def test_a_task_is_admitted_whole_under_the_queue_cap(dummy_lm):
    """A zero-shot classify is one request to the cap although it sends dozens of scoring requests: accepted whole
    while the queue has room (before, its third scoring request hit the cap and failed it), and while its scoring
    requests wait, a plain request and a second classify are refused with 429 and nothing of them runs."""
    engine = make_engine(dummy_lm, max_num_seqs=1, max_waiting=2)
    app = make_app(engine)
    classify = {"input": "The match ended 2-1.", "labels": ["sports", "politics", "cooking"]}

    async def scenario():
        await app.state.lifecycle.warmup()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            first = asyncio.create_task(c.post("/v1/classify", json=classify))
            assert await asyncio.to_thread(wait_until, lambda: engine.stats().waiting > 2)
            plain = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            second = await c.post("/v1/classify", json=classify)
            return await first, plain, second

    try:
        first, plain, second = asyncio.run(scenario())
        assert first.status_code == 200, first.text
        assert set(first.json()["data"][0]["scores"]) == {"sports", "politics", "cooking"}
        for r in (plain, second):
            assert error_of(r, 429)["code"] == "rate_limit_exceeded"
        assert wait_until(lambda: engine.stats().free_blocks == engine.stats().num_blocks)
        assert engine.stats().waiting == 0 and engine.admission.queued() == (0, 0)
    finally:
        engine.shutdown()


def test_retry_after_falls_back_to_the_setting_without_an_estimate():
    from server.api.errors import from_engine_error
    from server.engine import QueueFullError
    assert from_engine_error(QueueFullError("full"), retry_after=3).headers == {"Retry-After": "3"}
    assert from_engine_error(QueueFullError("full", retry_after=12), retry_after=3).headers == {"Retry-After": "12"}


# -- 503 ------------------------------------------------------------------------------------------------------------
def test_loading_model_is_503_until_ready(dummy_lm):
    release = threading.Event()
    engine_box = {}

    def loader():
        release.wait(30)
        engine_box["engine"] = make_engine(dummy_lm)
        return engine_box["engine"], "slow-model", dummy_lm.tokenizer

    app = create_app(None, ServerSettings(), loader=loader)
    try:
        with TestClient(app) as c:
            assert c.get("/health").json() == {"status": "ok"}
            err = error_of(c.get("/ready"), 503)
            assert "loading" in err["message"]
            assert error_of(c.get("/v1/models"), 503)["code"] == "not_ready"
            assert error_of(c.post("/v1/chat/completions", json=CHAT), 503)["type"] == "service_unavailable"
            scrape = c.get("/metrics")  # request metrics already; no engine gauges until there is an engine
            assert scrape.status_code == 200 and "# TYPE loom_time_to_first_token_seconds histogram" in scrape.text
            assert "loom_num_requests_running" not in scrape.text
            release.set()
            assert wait_until(lambda: c.get("/ready").status_code == 200, 30)
            assert c.get("/v1/models").json()["data"][0]["id"] == "slow-model"
    finally:
        release.set()
        if "engine" in engine_box:
            engine_box["engine"].shutdown()


def test_dead_engine_is_503(dummy_lm):
    engine = make_engine(dummy_lm)
    with TestClient(make_app(engine)) as c:
        assert wait_until(lambda: c.get("/ready").status_code == 200)
        engine.shutdown()  # the loop thread stops: the engine is no longer healthy
        assert wait_until(lambda: not engine.healthy)
        assert "stopped" in error_of(c.get("/ready"), 503)["message"]
        error_of(c.post("/v1/completions", json={"prompt": "x"}), 503)
        assert "loom_engine_healthy 0.0" in c.get("/metrics").text


def test_health_is_503_once_the_engine_loop_has_died(dummy_lm):
    """/health is the liveness probe: while the engine loop is dead the process can serve nothing, so the probe must
    fail and get it restarted (it used to say 200 while every other route answered 503)."""
    engine = make_engine(dummy_lm)

    def fatal():
        raise SystemError("engine thread lost")

    try:
        with TestClient(make_app(engine)) as c:
            assert wait_until(lambda: c.get("/ready").status_code == 200)
            assert c.get("/health").json() == {"status": "ok"}
            engine.core.step = fatal  # the loop itself fails, not a request
            err = error_of(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)
            assert err["code"] == "engine_unavailable"
            err = error_of(c.get("/health"), 503)
            assert (err["type"], err["code"]) == ("service_unavailable", "engine_unavailable")
            assert "SystemError" in err["message"]
            assert "stopped" in error_of(c.get("/ready"), 503)["message"]
    finally:
        engine.shutdown()


def test_draining_is_503(dummy_engine):
    app = make_app(dummy_engine)
    with TestClient(app) as c:
        assert wait_until(lambda: c.get("/ready").status_code == 200)
        app.state.lifecycle.draining = True
        assert "shutting down" in error_of(c.get("/ready"), 503)["message"]
        error_of(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/health").status_code == 200


def test_unexpected_failure_is_500_in_openai_shape(dummy_engine):
    app = make_app(dummy_engine)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c:
        assert wait_until(lambda: c.get("/ready").status_code == 200)
        app.state.tracker.generate = broken
        err = error_of(c.post("/v1/completions", json={"prompt": "x"}), 500)
        assert err["type"] == "internal_server_error" and "boom" not in err["message"]


# -- 401 ------------------------------------------------------------------------------------------------------------
def test_api_key_guards_v1_only(dummy_engine):
    with TestClient(make_app(dummy_engine, api_key="s3cret")) as c:
        assert wait_until(lambda: c.get("/ready").status_code == 200)
        err = error_of(c.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert error_of(r, 401)["message"] == "incorrect API key" and r.headers["www-authenticate"] == "Bearer"
        error_of(c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Basic s3cret"}), 401)
        error_of(c.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}), 401)
        refused = c.get("/metrics").text  # refused by the middleware before the app: counted all the same
        assert 'loom_request_errors_total{status="401"} 4.0' in refused
        ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "dummy:tiny"
        for open_path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
            assert c.get(open_path).status_code == 200, open_path


# -- 504 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def slow_engine(dummy_lm, monkeypatch):
    """Its own engine, 5 ms per step and one token per step: 400 tokens take 2 s, far past the timeouts below."""
    engine = make_engine(dummy_lm, speculative="none")
    real_run = engine.core.runner.run

    def slow_run(sched):
        time.sleep(0.005)
        return real_run(sched)

    monkeypatch.setattr(engine.core.runner, "run", slow_run)
    yield engine
    engine.shutdown()


LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_timeout_is_504_and_frees_everything(slow_engine):
    with TestClient(make_app(slow_engine)) as c:
        wait_ready(c.get)
        started = time.monotonic()
        err = error_of(c.post("/v1/completions", json={**LONG, "timeout": 0.3}), 504)
        assert 0.3 <= time.monotonic() - started < 1.5
        assert err["type"] == "timeout_error" and err["code"] == "request_timeout"
        assert wait_until(lambda: engine_idle(slow_engine))
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "ignore_eos": True,
                "timeout": 0.2}
        assert error_of(c.post("/v1/chat/completions", json=chat), 504)["code"] == "request_timeout"
        summarize = {"input": "The loom weaves threads into cloth. " * 40, "max_tokens": 400, "timeout": 0.3}
        assert error_of(c.post("/v1/summarize", json=summarize), 504)["code"] == "request_timeout"
        classify = {"input": ["good", "bad", "fine"], "labels": ["positive", "negative", "neutral"], "timeout": 0.02}
        assert error_of(c.post("/v1/classify", json=classify), 504)["code"] == "request_timeout"
        assert wait_until(lambda: engine_idle(slow_engine)), "every sub-request of summarize and classify was aborted"
        metrics = c.get("/metrics").text
        for endpoint in ("completions", "chat", "summarize", "classify"):
            series = f'loom_requests_total{{endpoint="{endpoint}",finish_reason="timeout",model="dummy:tiny"}}'
            assert series in metrics, endpoint
        error_of(c.post("/v1/completions", json={**LONG, "timeout": 0}), 400)


def test_streamed_timeout_is_an_error_event_then_done(slow_engine):
    with TestClient(make_app(slow_engine)) as c:
        wait_ready(c.get)
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True, "timeout": 0.3}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
        assert len(lines) > 3, "tokens streamed before the deadline"
        assert wait_until(lambda: engine_idle(slow_engine))


def test_server_default_timeout_and_queue_time_counts(slow_engine):
    """`--request-timeout` applies to requests without their own; time spent waiting for a slot counts."""
    slow_engine.core.scheduler.max_num_seqs = 1
    with TestClient(make_app(slow_engine, request_timeout=0.5)) as c:
        wait_ready(c.get)
        results: dict[str, int] = {}

        def post(name: str, body: dict) -> None:
            results[name] = c.post("/v1/completions", json=body).status_code

        hog = threading.Thread(target=post, args=("hog", {**LONG, "timeout": 30, "max_tokens": 150}))
        hog.start()
        assert wait_until(lambda: slow_engine.stats().running == 1)
        started = time.monotonic()
        post("queued", {**LONG, "max_tokens": 2})  # two tokens, but the only slot stays busy past its deadline
        assert results["queued"] == 504 and time.monotonic() - started < 1.5
        hog.join(30)
        assert results["hog"] == 200
        assert wait_until(lambda: engine_idle(slow_engine))


def test_summarize_inputs_are_checked_before_any_work(dummy_engine):
    """Each input of a batch is checked up front; the error names the one at fault."""
    with TestClient(make_app(dummy_engine, summarize_max_input_chars=1000)) as c:
        wait_ready(c.get)
        err = error_of(c.post("/v1/summarize", json={"input": ["A fine text.", "   "]}), 400)
        assert err["param"] == "input.1" and "empty" in err["message"]
        err = error_of(c.post("/v1/summarize", json={"input": ["A fine text.", "x" * 1001]}), 400)
        assert err["param"] == "input.1" and err["code"] == "input_too_long"
        err = error_of(c.post("/v1/summarize", json={"input": "x" * 1001}), 400)
        assert err["param"] == "input" and err["code"] == "input_too_long"
