"""/metrics: Prometheus text with every `loom_` series the design lists, fed by real requests; requests, tokens and
latencies labelled by the served name each request asked for (the base model, a LoRA adapter, a --models-dir model)."""
from __future__ import annotations

import re

from fastapi.testclient import TestClient

from server.api import ServerSettings, create_app
from server.cli.models_dir import DirectoryModels
from server.engine import EngineSettings
from server.model import ModelSettings
from tests.support.gguf_files import write_gguf
from tests.support.lora import write_adapter
from tests.support.models import load_fp32
from tests.support.servers import make_app, make_engine, wait_ready

COUNTERS = ["loom_requests_total", "loom_prompt_tokens_total", "loom_generation_tokens_total",
            "loom_preemptions_total", "loom_prefix_cache_hit_tokens_total", "loom_prefix_cache_query_tokens_total",
            "loom_request_errors_total"]
GAUGES = ["loom_num_requests_running", "loom_num_requests_waiting", "loom_kv_cache_usage_ratio"]
BASE = 'model="dummy:tiny"'  # the label of requests for the model make_app serves
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
    assert value(text, f'loom_requests_total{{endpoint="chat",finish_reason="length",{BASE}}}') == 2
    assert value(text, f'loom_requests_total{{endpoint="completions",finish_reason="length",{BASE}}}') == 2
    assert value(text, f'loom_requests_total{{endpoint="classify",finish_reason="length",{BASE}}}') > 0
    assert value(text, 'loom_request_errors_total{status="400"}') == 1
    assert value(text, "loom_num_requests_running") == 0 and value(text, "loom_kv_cache_usage_ratio") == 0
    assert value(text, f"loom_time_to_first_token_seconds_count{{{BASE}}}") == 2 + 1  # chat x2, completions once
    assert value(text, f"loom_inter_token_latency_seconds_count{{{BASE}}}") == 2 * 4 + 2 * 2
    assert value(text, f"loom_time_per_output_token_seconds_count{{{BASE}}}") == 4
    assert value(text, f"loom_generation_tokens_total{{{BASE}}}") >= 2 * 5 + 2 * 3
    assert value(text, "loom_prefix_cache_hit_tokens_total") > 0  # the second chat reused the first's prompt
    assert value(text, "loom_batch_size_count") > 0
    assert value(text, f"loom_e2e_request_latency_seconds_count{{{BASE}}}") >= 3


def test_requests_tokens_and_latencies_by_model(tiny_checkpoints, tmp_path):
    """One request each to the base model, an adapter and a directory model: each counted under its own name."""
    adapter = write_adapter(tiny_checkpoints["llama"], tmp_path / "adapter", r=4, seed=1)
    (tmp_path / "dir").mkdir()
    write_gguf(tmp_path / "dir" / "alpha.gguf", "llama", {"default": "Q8_0"}, seed=1, keep_floats=False)
    opener = DirectoryModels(ModelSettings(dtype="float32", kernel_calibration=False),
                             EngineSettings(num_kv_blocks=64, max_model_len=512, max_num_seqs=4))
    engine = make_engine(load_fp32(tiny_checkpoints["llama"]), enable_lora=True, max_loras=1, max_lora_rank=8)
    app = create_app(engine, ServerSettings(models_dir=tmp_path / "dir"), "base", engine.tokenizer,
                     shutdown_engine=False, model_opener=opener)
    tokens = {"base": 3, "tuned": 4, "alpha": 5}
    try:
        with TestClient(app) as c:
            wait_ready(c.get)
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "tuned", "lora_path": str(adapter)})
            assert r.status_code == 200, r.text
            prompts = {}
            for model, n in tokens.items():
                body = {"model": model, "prompt": "Hello there", "max_tokens": n, "ignore_eos": True}
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["model"] == model, r.text
                prompts[model] = r.json()["usage"]["prompt_tokens"]
            assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            text = c.get("/metrics").text
    finally:
        engine.shutdown()
    for model, n in tokens.items():
        label = f'model="{model}"'
        assert value(text, f'loom_requests_total{{endpoint="completions",finish_reason="length",{label}}}') == 1
        assert value(text, f"loom_generation_tokens_total{{{label}}}") == n
        assert value(text, f"loom_prompt_tokens_total{{{label}}}") == prompts[model]
        for hist in ("loom_time_to_first_token_seconds", "loom_e2e_request_latency_seconds",
                     "loom_time_per_output_token_seconds", "loom_request_queue_time_seconds"):
            assert value(text, f"{hist}_count{{{label}}}") == 1, (hist, model)
        assert value(text, f"loom_inter_token_latency_seconds_count{{{label}}}") == n - 1
    assert 'model="nope"' not in text
