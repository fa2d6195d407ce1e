"""One request must not hurt the others: huge bodies are refused before the CPU work, and the CPU work that remains
(tokenizing, chat templates, splitting documents) runs off the event loop, so /health stays fast."""
from __future__ import annotations

import threading
import time

import httpx

from tests.support.servers import ThreadServer, make_app


def test_health_stays_fast_while_huge_bodies_are_handled(dummy_engine):
    app = make_app(dummy_engine, max_body_bytes=16 * 2 ** 20, summarize_chunk_tokens=256)
    with ThreadServer(app) as server:
        statuses: dict[str, int] = {}

        def post(name: str, path: str, body: dict) -> None:
            statuses[name] = httpx.post(server.url + path, json=body, timeout=120).status_code

        work = [
            ("completion 7 MB", "/v1/completions", {"prompt": "word " * 1_400_000, "max_tokens": 4}),
            ("summarize 8 MB", "/v1/summarize", {"input": "A sentence about looms. " * 333_000}),
            ("chat 7 MB", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 2_333_000}]}),
            ("summarize 300 kB", "/v1/summarize", {"input": "The loom weaves threads into cloth. " * 8_500,
                                                  "timeout": 3}),
        ]
        threads = [threading.Thread(target=post, args=w) for w in work]
        latencies = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                started = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        for t in threads:
            t.join()
    assert statuses == {"completion 7 MB": 400, "summarize 8 MB": 400, "chat 7 MB": 400, "summarize 300 kB": 504}, \
        statuses
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if len(latencies) > 1 else latencies[0]
    # Tokenizing one of these bodies on the event loop stalls it for seconds; 0.5 s leaves room for a second test
    # process busy on the other core (p99 0.11 s seen there, 0.04 s alone).
    assert len(latencies) >= 20 and p99 < 0.5, (len(latencies), p99, latencies[-5:])
