"""`loom serve` as a process (dummy model): configuration by flags and LOOM_* variables, readiness, and graceful
shutdown on SIGTERM (readiness off and the socket closed at once, in-flight streams finish within --drain-timeout,
the rest are aborted, exit code 0)."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.support.servers import free_port, start_loom_serve, stop, wait_ready


def read_stream(url: str, body: dict, started: threading.Event, result: dict, headers: dict | None = None) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    payload = line[6:]
                    if payload == "[DONE]":
                        result["done"] = True
                        continue
                    chunk = json.loads(payload)
                    if chunk.get("usage"):  # a chunk may carry several tokens (speculative decoding)
                        result["tokens"] = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):
                        result["finish"] = chunk["choices"][0]["finish_reason"] or result.get("finish")
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        started.set()


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args: str, env: dict | None = None):
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        proc = start_loom_serve(["--model", "dummy:tiny", "--num-kv-blocks", "512", *args], port, log, env)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        proc.log, proc.url = log, url
        return proc

    yield start
    for p in procs:
        stop(p)


def wait_proc_ready(proc, headers=None) -> None:
    try:
        wait_ready(lambda path: httpx.get(proc.url + path, timeout=5, headers=headers), timeout=90)
    except TimeoutError:
        raise TimeoutError(proc.log.read_text()[-3000:]) from None


def stream_in_background(proc, max_tokens: int, headers=None) -> tuple[threading.Thread, dict]:
    """A streamed completion of `max_tokens` read on a thread; returns once its first chunk arrived."""
    started, result = threading.Event(), {}
    body = {"prompt": "long", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    reader = threading.Thread(target=read_stream, args=(proc.url, body, started, result, headers))
    reader.start()
    assert started.wait(30)
    return reader, result


def test_sigterm_lets_inflight_streams_finish(serve):
    proc = serve("--drain-timeout", "60")
    assert wait_proc_ready(proc) is None
    assert httpx.get(proc.url + "/health").json() == {"status": "ok"}
    reader, result = stream_in_background(proc, 600)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections once the signal is in
        httpx.get(proc.url + "/health", timeout=2)
    reader.join(60)
    assert result.get("status") == 200 and "error" not in result, result
    assert result.get("finish") == "length" and result.get("tokens") == 600 and result.get("done"), result
    assert proc.wait(30) == 0, proc.log.read_text()[-2000:]


def test_drain_timeout_aborts_the_rest_and_env_config(serve):
    """Also: configuration from LOOM_* variables (API key, drain timeout)."""
    proc = serve(env={"LOOM_API_KEY": "k3y", "LOOM_DRAIN_TIMEOUT": "0.5", "LOOM_MAX_MODEL_LEN": "2048"})
    auth = {"Authorization": "Bearer k3y"}
    wait_proc_ready(proc)
    assert httpx.get(proc.url + "/v1/models").status_code == 401
    models = httpx.get(proc.url + "/v1/models", headers=auth).json()
    assert models["data"][0]["max_model_len"] == 2048
    reader, result = stream_in_background(proc, 2000, auth)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    reader.join(30)
    assert result.get("finish") == "abort" and result.get("done") and result.get("tokens", 0) < 2000, result
    assert proc.wait(30) == 0, proc.log.read_text()[-2000:]
    assert time.monotonic() - t0 < 15


def test_ready_is_503_while_loading_then_200(serve):
    proc = serve()
    seen = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            r = httpx.get(proc.url + "/ready", timeout=5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen.add(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "not_ready"
            assert httpx.get(proc.url + "/health").status_code == 200
        if r.status_code == 200:
            break
        time.sleep(0.02)
    assert 200 in seen, proc.log.read_text()[-2000:]
    assert 503 in seen, "the model loaded before the first /ready probe; expected a loading phase"


def test_failed_model_load_exits_nonzero(serve, tmp_path):
    proc = serve("--model", str(tmp_path / "no-such-model"))
    assert proc.wait(90) != 0
    assert "no-such-model" in proc.log.read_text()


def test_a_second_signal_ends_the_drain_at_once(serve):
    proc = serve("--drain-timeout", "60")
    wait_proc_ready(proc)
    reader, result = stream_in_background(proc, 2000)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None, "the first signal drains (the stream is still running)"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.log.read_text()[-2000:]
    assert time.monotonic() - t0 < 10
    reader.join(15)
    assert result.get("finish") == "abort" and result.get("tokens", 0) < 2000, result
