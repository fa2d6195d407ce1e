"""The FastAPI app factory. Everything an app needs hangs off `app.state` (settings, the Serving handle with the
engine and metrics); nothing is module-global, so tests can build several apps in one process."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI

from server.api.auth import APIKeyMiddleware, require_api_key
from server.api.errors import install_error_handlers
from server.api.lifecycle import InflightMiddleware, Loader, make_lifespan
from server.api.limits import BodySizeLimitMiddleware
from server.api.routes import chat, classify, completions, health, models, summarize
from server.api.serving import Serving
from server.api.settings import ServerSettings
from server.engine import AsyncEngine

DESCRIPTION = """OpenAI-compatible completions and chat (streamed over SSE or not), plus summarization and
zero-shot classification, served by Loom's continuous-batching engine. Errors follow OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`."""


def create_app(engine: AsyncEngine | None, settings: ServerSettings | None = None, model_name: str | None = None,
               tokenizer=None, *, loader: Loader | None = None, on_fatal: Callable[[str], None] | None = None,
               shutdown_engine: bool = True) -> FastAPI:
    """An app serving `engine` (already built), or, with `loader`, one that loads the model in the background
    after startup (/health answers at once, /ready says 503 until the model is loaded and warm).
    `shutdown_engine`: stop the engine when the app shuts down (tests sharing an engine pass False)."""
    settings = settings or ServerSettings()
    serving = Serving(settings, engine, model_name, tokenizer)
    app = FastAPI(title="Loom", version="0.1.0", description=DESCRIPTION,
                  lifespan=make_lifespan(loader, on_fatal, shutdown_engine))
    app.state.settings = settings
    app.state.serving = serving
    install_error_handlers(app)
    secured = [Depends(require_api_key)]
    for module in (completions, chat, summarize, classify, models):
        app.include_router(module.router, dependencies=secured, tags=["v1"])
    app.include_router(health.router, tags=["ops"])
    app.add_middleware(InflightMiddleware, serving=serving)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # outermost: refuse before reading anything
    return app
