"""What the routes share: the engine (once the model is loaded), its name and tokenizer, readiness and draining, and
`generate`, AsyncEngine.generate with request tracking (for graceful shutdown) and latency metrics."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import APIError
from server.api.metrics import Metrics
from server.api.settings import ServerSettings
from server.engine import AsyncEngine, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger("loom.api")


class Serving:
    def __init__(self, settings: ServerSettings, engine: AsyncEngine | None = None, model_name: str | None = None,
                 tokenizer=None):
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.model_name: str | None = None
        self.tokenizer = None
        self.max_model_len = 0
        self.created = int(time.time())
        self.warmed_up = False
        self.load_error: str | None = None
        self.draining = False  # SIGTERM: /ready fails, new requests are refused, in-flight ones finish
        self.accepting_engine_work = True  # off once the drain timeout has passed
        self.active: set[str] = set()  # engine request ids in flight
        self.http_inflight = 0  # /v1 HTTP requests in flight (streams included)
        self.classifier = None  # built on first use; keeps its calibration cache across requests
        self._ids = itertools.count()
        self.metrics = Metrics(self.stats)
        if engine is not None:
            self.attach(engine, model_name or "default", tokenizer or engine.tokenizer)

    def attach(self, engine: AsyncEngine, model_name: str, tokenizer) -> None:
        self.engine, self.model_name, self.tokenizer = engine, model_name, tokenizer
        self.max_model_len = engine.max_model_len
        self.classifier = None
        if engine.on_step is None:
            engine.on_step = self.metrics.observe_step

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    # -- readiness ------------------------------------------------------------------------------------------
    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        if self.engine is None:
            return "the model is still loading"
        if not self.engine.healthy:
            return f"the engine has stopped: {self.engine.error!r}"
        if not self.warmed_up:
            return "the model is warming up"
        stalled = time.monotonic() - self.engine.last_step_time
        if stalled > self.settings.ready_stall_seconds:
            return f"the engine loop has not stepped for {stalled:.0f} s"
        return None

    def require_ready(self) -> AsyncEngine:
        reason = self.not_ready_reason()
        if reason:
            raise APIError(503, reason, code="not_ready", headers={"Retry-After": "5"})
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def warmup(self) -> None:
        """One short greedy request, so the first client does not pay for lazy initialisation."""
        if self.settings.warmup:
            prompt = self.tokenizer.encode("Hello, world")[:8] or [0]
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            async for _ in self.engine.generate(prompt, params, request_id="warmup"):
                pass
        self.warmed_up = True
        log.info("ready", extra={"model": self.model_name})

    # -- requests -------------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, endpoint: str = "other",
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate, tracked: leaving early (client gone, task cancelled) aborts the request."""
        if self.engine is None or not self.accepting_engine_work:
            raise APIError(503, self.not_ready_reason() or "the server is shutting down", code="not_ready")
        request_id = request_id or f"{endpoint}-{next(self._ids)}"
        timer = self.metrics.timer(endpoint)
        stream = self.engine.generate(prompt_token_ids, params, request_id=request_id, priority=priority)
        self.active.add(request_id)
        try:
            async for out in stream:
                timer.observe(out)
                yield out
            timer.done()
        except (GeneratorExit, asyncio.CancelledError):  # the caller left: the engine request is aborted below
            timer.abandoned(params.n)
            raise
        finally:
            self.active.discard(request_id)
            await stream.aclose()  # aborts in the engine if it had not finished

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: wait up to `timeout` for in-flight work, then abort what is left."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.http_inflight or self.active) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.accepting_engine_work = False
        if self.active and self.engine is not None:
            log.warning("drain timeout: aborting requests", extra={"count": len(self.active)})
            for request_id in list(self.active):
                self.engine.abort(request_id)
        grace = time.monotonic() + 5.0  # let aborted responses send their last chunk
        while self.http_inflight and time.monotonic() < grace:
            await asyncio.sleep(0.05)


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


def ready_serving(request: Request) -> Serving:
    """Dependency of every /v1 route: the engine must be loaded, warm and not draining."""
    serving: Serving = request.app.state.serving
    serving.require_ready()
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]
ReadyServing = Annotated[Serving, Depends(ready_serving)]
