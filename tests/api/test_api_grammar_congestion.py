"""Grammar compile congestion over HTTP: slow grammars that time out or whose clients leave stop costing the compile
workers at once, so a trivial regex right after them compiles promptly; congestion answers 503
`grammar_compiler_busy` with Retry-After, never a 400 that blames a simple grammar."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
from fastapi.testclient import TestClient

from tests.api.test_api_errors import error_of
from tests.support.servers import ThreadServer, make_app, make_engine, wait_ready

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
TRIVIAL = {**CHAT, "structured_outputs": {"regex": "[0-9]{3}"}}


def slow(tag: str) -> dict:
    """A choice among 50,000 strings: tens of seconds to compile, far past every limit here."""
    return {**CHAT, "structured_outputs": {"choice": [f"{tag}-{i:05d}-option" for i in range(50_000)]}}


def refused(r) -> str:
    """A slow grammar's answer: stopped at the compile limit (400), or no worker free in time (503 + Retry-After)."""
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) >= 1, r.headers
        assert error_of(r, 503)["code"] == "grammar_compiler_busy"
        return "busy"
    err = error_of(r, 400)
    assert err["code"] == "grammar_compile_timeout" and err["param"] == "structured_outputs.choice", err
    return "timeout"


def test_slow_grammars_that_time_out_leave_the_compilers_free(dummy_lm):
    engine = make_engine(dummy_lm, grammar_compile_timeout=1.5, grammar_compile_workers=2)
    try:
        with TestClient(make_app(engine)) as c:
            wait_ready(c.get)
            assert c.post("/v1/chat/completions", json=TRIVIAL).status_code == 200  # compile processes up
            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(lambda i: c.post("/v1/chat/completions", json=slow(f"t{i}")), range(5)))
            assert "timeout" in [refused(r) for r in answers]
            started = time.monotonic()
            r = c.post("/v1/chat/completions", json={**TRIVIAL, "structured_outputs": {"regex": "[a-f]{4}"}})
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 3
    finally:
        engine.shutdown()


def test_a_full_compile_queue_is_503_with_retry_after(dummy_lm):
    engine = make_engine(dummy_lm, grammar_compile_timeout=2, grammar_compile_workers=1, grammar_compile_queue=1)
    try:
        with TestClient(make_app(engine)) as c:
            wait_ready(c.get)
            assert c.post("/v1/chat/completions", json=TRIVIAL).status_code == 200
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda i: c.post("/v1/chat/completions", json=slow(f"q{i}")), range(3)))
            kinds = [refused(r) for r in answers]
            assert "busy" in kinds and "timeout" in kinds, kinds
    finally:
        engine.shutdown()


def test_a_client_that_leaves_abandons_its_compile(dummy_lm):
    """One worker and a long compile limit: only the client's leaving can free the worker for the next request."""
    engine = make_engine(dummy_lm, grammar_compile_timeout=120, grammar_compile_workers=1)
    try:
        with ThreadServer(make_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/chat/completions", json=TRIVIAL).status_code == 200
            try:
                c.post("/v1/chat/completions", json=slow("gone"), timeout=1.0)
                raise AssertionError("the slow grammar answered")
            except httpx.ReadTimeout:  # the client gives up and closes its connection
                pass
            started = time.monotonic()
            r = c.post("/v1/chat/completions", json={**TRIVIAL, "structured_outputs": {"regex": "[g-k]{2}"}})
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 5
    finally:
        engine.shutdown()
