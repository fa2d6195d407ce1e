"""Slow and broken clients against a real `loom serve` process (dummy model, raw sockets): half-sent requests are
answered 408 and closed within --read-timeout, a body that keeps moving is not, a partial body does not hold up the
shutdown of an idle server, and malformed HTTP gets a JSON 400 in OpenAI's shape (issue 16, items 6 and 8)."""
from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import pytest

from tests.support.servers import free_port, start_loom_serve, stop, wait_ready


def start(tmp_path, *args: str):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    proc = start_loom_serve(["--model", "dummy:tiny", "--num-kv-blocks", "256", *args], port, log)
    proc.log, proc.port, proc.url = log, port, f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda path: httpx.get(proc.url + path, timeout=5), timeout=240)
    except TimeoutError:
        stop(proc)
        raise TimeoutError(log.read_text()[-3000:]) from None
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that leave it running (read timeout 1.5 s)."""
    proc = start(tmp_path_factory.mktemp("slow"), "--read-timeout", "1.5")
    yield proc
    assert stop(proc) == 0


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (s since the call)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout):
        raise AssertionError(f"the connection was still open after {timeout} s; got {data[:300]!r}") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def response(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


BODY = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY))


def test_half_sent_requests_get_408_within_the_read_timeout(server):
    proc = server
    partial_headers = [connect(proc.port) for _ in range(20)]
    for s in partial_headers:
        s.sendall(HEAD[:30])  # request line and part of a header
    partial_bodies = [connect(proc.port) for _ in range(20)]
    for s in partial_bodies:
        s.sendall(HEAD + BODY[:5])
    silent = connect(proc.port)  # connects, never sends a byte
    for s in [*partial_headers, *partial_bodies]:
        raw, waited = read_all(s, timeout=6)
        status, headers, body = response(raw)
        assert status == 408 and headers["connection"] == "close", raw
        assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error"
        assert waited < 4
    raw, _ = read_all(silent, timeout=6)
    assert response(raw)[0] == 408
    # the server is fine, serves the next request, and counted the 408s
    r = httpx.post(proc.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    metrics = httpx.get(proc.url + "/metrics", timeout=10).text
    assert 'loom_request_errors_total{status="408"} 41.0' in metrics
    assert "status=\"400\"" not in metrics  # the routes waiting for those bodies saw a disconnect, not an error
    assert "loom_kv_cache_usage_ratio 0.0" in metrics


def test_a_slow_body_that_keeps_moving_is_served(server):
    s = connect(server.port)
    s.sendall(HEAD)
    for i in range(0, len(BODY), 8):  # ~2-3 s in all (more than the timeout), never 1.5 s without a byte
        time.sleep(0.4)
        s.sendall(BODY[i:i + 8])
    raw, _ = read_all_response(s)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]


def read_all_response(s: socket.socket) -> tuple[bytes, float]:
    """One keep-alive response (Content-Length framed), without waiting for the connection to close."""
    t0 = time.monotonic()
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body, time.monotonic() - t0


def test_a_partial_body_does_not_hold_up_the_shutdown(tmp_path):
    proc = start(tmp_path, "--read-timeout", "60", "--drain-timeout", "30")
    s = connect(proc.port)
    s.sendall(HEAD + BODY[:5])
    time.sleep(0.5)  # the request is in: its route waits for the rest of the body
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    took = time.monotonic() - t0
    raw, _ = read_all(s, timeout=5)
    assert code == 0
    assert took < 5, f"an idle server took {took:.1f} s to stop"
    status, _, body = response(raw)
    assert status == 503 and body["error"]["code"] == "shutting_down", raw  # never uvicorn's plain-text 500
    assert "Traceback" not in proc.log.read_text()


MALFORMED = [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/1.1\r\nHo st: x\r\n\r\n",
    b"NOT-HTTP\r\n\r\n",
]


def test_malformed_http_gets_a_json_400(server):
    proc = server
    before = errors_counted(proc.url, "400")
    for head in MALFORMED:
        s = connect(proc.port)
        s.sendall(head)
        raw, _ = read_all(s, timeout=10)
        status, headers, body = response(raw)
        assert status == 400 and headers["content-type"] == "application/json", head
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_http_request"
    assert errors_counted(proc.url, "400") == before + len(MALFORMED)


def errors_counted(url: str, status: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'loom_request_errors_total{{status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0
