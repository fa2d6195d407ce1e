"""Real traffic beside hostile requests: the fixtures test_api_hostile.py and test_api_hostile_agents.py share. Each
module defines its own `hostile_server` (a ThreadServer whose `.engine` is its engine) and imports these; they are
registered under the names tests ask for (`traffic`, `client`), so importing them shadows nothing."""
from __future__ import annotations

import json
import threading

import httpx
import pytest


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


@pytest.fixture(scope="module", name="traffic")
def real_traffic(hostile_server):
    t = RealTraffic(hostile_server.url)
    t.thread.start()
    yield t
    t.stop.set()
    t.thread.join(60)


@pytest.fixture(scope="module", name="client")
def hostile_client(hostile_server):
    with httpx.Client(base_url=hostile_server.url, timeout=30) as c:
        yield c
