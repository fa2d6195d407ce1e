"""A fake OpenAI-compatible streaming server with known timings, for testing the load-test harness.

Every completion streams `max_tokens` tokens: the first after `ttft` seconds, then one chunk every `itl` seconds
(`tokens_per_chunk` tokens per chunk). The prompt can steer one request:
  `ttft=250`  first token after 250 ms      `itl=40`  40 ms between chunks
  `fail`      answer HTTP 500               `midfail` stream 2 tokens, then an error event
  `eos`       stop after 3 tokens (as a server that does not honour ignore_eos)
/metrics serves Loom's gauges (`loom_kv_cache_usage_ratio`, `loom_num_requests_running`, ...); /ready and
/health answer 200.

As a subprocess (timings unaffected by the client's GIL): `python -m tests.support.fake_openai_server --port N
[--ttft-ms 50 --itl-ms 10]`, reconfigured with `POST /fake/config {"ttft": 0.1, ...}`; or in process:
`with running(FakeConfig(...)) as base_url: ...`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tests.support.ports import free_port


@dataclass
class FakeConfig:
    ttft: float = 0.05
    itl: float = 0.01
    tokens_per_chunk: int = 1
    report_usage: bool = True
    model: str = "fake-model"
    kv_usage_after: float = 0.0  # what /metrics reports for loom_kv_cache_usage when idle


def make_app(cfg: FakeConfig) -> FastAPI:
    app = FastAPI()
    state = {"running": 0, "served": 0}

    @app.get("/health")
    @app.get("/ready")
    async def ready():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model, "object": "model"}]}

    @app.post("/fake/config")
    async def configure(request: Request):
        """Tests change the timings of a running fake (fields of FakeConfig)."""
        for k, v in (await request.json()).items():
            setattr(cfg, k, type(getattr(cfg, k))(v))
        return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}

    @app.get("/metrics")
    async def metrics():
        kv = cfg.kv_usage_after if state["running"] == 0 else 0.5
        return PlainTextResponse(f"# TYPE loom_kv_cache_usage_ratio gauge\nloom_kv_cache_usage_ratio {kv}\n"
                                 f"# TYPE loom_num_requests_running gauge\n"
                                 f"loom_num_requests_running {state['running']}\nloom_num_requests_waiting 0\n"
                                 f"loom_requests_total{{endpoint=\"completions\"}} {state['served']}\n")

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt") or json.dumps(body.get("messages"))
        if "midfail" not in prompt and "fail" in prompt:
            return JSONResponse({"error": {"message": "injected failure", "code": 500}}, 500)
        ttft = float(m.group(1)) / 1000 if (m := re.search(r"ttft=(\d+)", prompt)) else cfg.ttft
        itl = float(m.group(1)) / 1000 if (m := re.search(r"itl=(\d+)", prompt)) else cfg.itl
        n = int(body.get("max_tokens") or 16)
        if "eos" in prompt and not re.search(r"\bignore\b", prompt):
            n = min(n, 3)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and cfg.report_usage
        chat = "messages" in body

        def chunk(text: str, finish=None) -> str:
            c = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                 else {"index": 0, "text": text, "finish_reason": finish})
            return "data: " + json.dumps({"id": "x", "object": "chunk", "model": cfg.model, "choices": [c]}) + "\n\n"

        async def stream():
            state["running"] += 1
            try:
                t0 = time.perf_counter()
                sent, k = 0, 0
                while sent < n:
                    # sleep to an absolute schedule so timing errors do not accumulate
                    due = t0 + ttft + k * itl
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    m = min(cfg.tokens_per_chunk, n - sent)
                    yield chunk(" tok" * m)
                    sent, k = sent + m, k + 1
                    if "midfail" in prompt and sent >= 2:
                        yield "data: " + json.dumps({"error": {"message": "injected mid-stream failure"}}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                yield chunk("", "length")
                if include_usage:
                    yield "data: " + json.dumps({"id": "x", "choices": [], "usage": {
                        "prompt_tokens": len(prompt.split()), "completion_tokens": n,
                        "total_tokens": len(prompt.split()) + n}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["running"] -= 1
                state["served"] += 1

        if not body.get("stream"):
            await asyncio.sleep(ttft + (n - 1) * itl)
            return {"id": "x", "choices": [{"index": 0, "text": " tok" * n, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n}}
        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def serve_app(app):
    """Serve an ASGI app from a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


@contextlib.contextmanager
def running(cfg: FakeConfig | None = None):
    """The fake, served from a background thread of this process; yields its base URL."""
    with serve_app(make_app(cfg or FakeConfig())) as url:
        yield url


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ttft-ms", type=float, default=50)
    p.add_argument("--itl-ms", type=float, default=10)
    p.add_argument("--model", default="fake-model")
    a, _ = p.parse_known_args()
    uvicorn.run(make_app(FakeConfig(a.ttft_ms / 1000, a.itl_ms / 1000, model=a.model)), host=a.host, port=a.port,
                log_level="error")


if __name__ == "__main__":
    main()
