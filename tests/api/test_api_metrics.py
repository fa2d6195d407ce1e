"""/metrics: Prometheus text with every `loom_` series the design lists, fed by real requests."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.support.servers import make_app, make_engine, wait_ready

COUNTERS = ["loom_requests_total", "loom_prompt_tokens_total", "loom_generation_tokens_total",
            "loom_preemptions_total", "loom_prefix_cache_hit_tokens_total", "loom_prefix_cache_query_tokens_total",
            "loom_request_errors_total"]
GAUGES = ["loom_num_requests_running", "loom_num_requests_waiting", "loom_kv_cache_usage_ratio"]
HISTOGRAMS = ["loom_time_to_first_token_seconds", "loom_time_per_output_token_seconds",
              "loom_inter_token_latency_seconds", "loom_e2e_request_latency_seconds",
              "loom_request_queue_time_seconds", "loom_batch_size"]


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert m, f"{series} missing"
    return float(m.group(1))


def test_metrics_after_traffic(dummy_lm):
    engine = make_engine(dummy_lm)  # its own engine, so the batch-size hook reports to this app
    try:
        with TestClient(make_app(engine)) as c:
            wait_ready(c.get)
            chat = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 5, "ignore_eos": True}
            for _ in range(2):
                assert c.post("/v1/chat/completions", json=chat).status_code == 200
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "n": 2}).status_code == 200
            assert c.post("/v1/classify", json={"input": "x", "labels": ["a", "b"]}).status_code == 200
            assert c.post("/v1/completions", json={"prompt": "x", "temperature": 9}).status_code == 400
            r = c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            text = r.text
    finally:
        engine.shutdown()
    for kind, names in (("counter", COUNTERS), ("gauge", GAUGES), ("histogram", HISTOGRAMS)):
        for name in names:
            assert re.search(rf"^# TYPE {re.escape(name)} {kind}$", text, re.MULTILINE), name
    assert "_created" not in text
    assert value(text, 'loom_requests_total{endpoint="chat",finish_reason="length"}') == 2
    assert value(text, 'loom_requests_total{endpoint="completions",finish_reason="length"}') == 2
    assert value(text, 'loom_requests_total{endpoint="classify",finish_reason="length"}') > 0
    assert value(text, 'loom_request_errors_total{status="400"}') == 1
    assert value(text, "loom_num_requests_running") == 0 and value(text, "loom_kv_cache_usage_ratio") == 0
    assert value(text, "loom_time_to_first_token_seconds_count") == 2 + 1  # chat x2, completions (n=2) once
    assert value(text, "loom_inter_token_latency_seconds_count") == 2 * 4 + 2 * 2
    assert value(text, "loom_time_per_output_token_seconds_count") == 4
    assert value(text, "loom_generation_tokens_total") >= 2 * 5 + 2 * 3
    assert value(text, "loom_prefix_cache_hit_tokens_total") > 0  # the second chat reused the first's prompt
    assert value(text, "loom_batch_size_count") > 0 and value(text, "loom_e2e_request_latency_seconds_count") >= 3
