"""Startup and shutdown: load the model in the background (so /health answers and /ready says 503 meanwhile), warm
it up, count in-flight /v1 requests for the graceful drain, and stop the engine when the app stops."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.serving import Serving
from server.engine import AsyncEngine

log = logging.getLogger("loom.api")

Loader = Callable[[], tuple[AsyncEngine, str, object]]  # blocking: returns (engine, model name, tokenizer)


def make_lifespan(loader: Loader | None, on_fatal: Callable[[str], None] | None = None,
                  shutdown_engine: bool = True):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        serving: Serving = app.state.serving
        serving.draining, serving.accepting_engine_work = False, True  # (re)started: open for work

        async def start() -> None:
            try:
                if serving.engine is None and loader is not None:
                    engine, name, tokenizer = await asyncio.to_thread(loader)
                    serving.attach(engine, name, tokenizer)
                if serving.engine is not None:
                    await serving.warmup()
            except Exception as exc:  # /ready reports it; the CLI exits non-zero
                log.exception("model load or warmup failed")
                serving.load_error = f"{type(exc).__name__}: {exc}"
                if on_fatal:
                    on_fatal(serving.load_error)

        task = asyncio.create_task(start())
        try:
            yield
        finally:
            serving.draining = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if shutdown_engine and serving.engine is not None:
                await asyncio.to_thread(serving.engine.shutdown)

    return lifespan


class InflightMiddleware:
    """Counts /v1 requests from their start to the last byte sent (SSE streams included)."""

    def __init__(self, app: ASGIApp, serving: Serving):
        self.app, self.serving = app, serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.serving.http_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.serving.http_inflight -= 1
