"""The FastAPI app factory: it takes its dependencies (an engine already built, or a loader that builds one in the
background) and hangs everything the routes use off `app.state`: settings, the lifecycle, the request tracker and
the metrics. Nothing is module-global, so tests can build several apps in one process."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI

from server.api.auth import APIKeyMiddleware, require_api_key
from server.api.errors import install_error_handlers
from server.api.lifecycle import InflightMiddleware, Lifecycle, Loader, make_lifespan
from server.api.limits import BodySizeLimitMiddleware
from server.api.metrics import Metrics
from server.api.model_pool import ModelOpener, ModelPool, scan_models_dir
from server.api.routes import (
    chat,
    classify,
    completions,
    embeddings,
    health,
    lora,
    messages,
    models,
    rerank,
    responses,
    status,
    summarize,
    tokenize,
)
from server.api.settings import ServerSettings
from server.api.tracking import RequestTracker
from server.api.webui import install_webui
from server.engine import AsyncEngine
from server.model import Tokenizer
from server.tasks import TaskSettings

DESCRIPTION = """OpenAI-compatible completions and chat (streamed over SSE or not), plus summarization and
zero-shot classification, served by Loom's continuous-batching engine; embeddings, rerank, score and fine-tuned
classifier heads from encoder models served beside the generator. Errors follow OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`."""


def create_app(engine: AsyncEngine | None, settings: ServerSettings | None = None, model_name: str | None = None,
               tokenizer: Tokenizer | None = None, *, task_settings: TaskSettings | None = None,
               loader: Loader | None = None, on_fatal: Callable[[str], None] | None = None,
               shutdown_engine: bool = True, model_opener: ModelOpener | None = None) -> FastAPI:
    """An app serving `engine` (already built), or, with `loader`, one that loads the model in the background
    after startup (/health answers at once, /ready says 503 until the model is loaded and warm).
    `shutdown_engine`: stop the engine when the app shuts down (tests sharing an engine pass False);
    `model_opener`: loads a --models-dir model by (name, path), when `settings.models_dir` is set."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    tracker = RequestTracker(metrics, settings.request_timeout)
    lifecycle = Lifecycle(settings, task_settings or TaskSettings(), tracker, metrics)
    if engine is not None:
        lifecycle.attach(engine, model_name or "default", tokenizer or engine.tokenizer)
    if settings.models_dir is not None and model_opener is not None:
        lifecycle.pool = ModelPool(scan_models_dir(settings.models_dir), model_opener, lifecycle.build_pooled,
                                   settings.max_loaded_models, settings.model_idle_unload, settings.model_load_wait,
                                   int(settings.model_memory_headroom * 2 ** 30))
    docs = {} if settings.docs != "off" else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Loom", version="0.1.0", description=DESCRIPTION,
                  lifespan=make_lifespan(lifecycle, loader, on_fatal, shutdown_engine), **docs)
    app.state.settings, app.state.lifecycle, app.state.tracker, app.state.metrics = settings, lifecycle, tracker, metrics
    install_error_handlers(app)
    secured = [Depends(require_api_key)]
    for module in (completions, chat, responses, messages, summarize, classify, embeddings, rerank, models, status,
                   tokenize, lora):
        app.include_router(module.router, dependencies=secured, tags=["v1"])
    app.include_router(health.router, tags=["ops"])
    if settings.webui:
        install_webui(app)
    app.add_middleware(InflightMiddleware, tracker=tracker)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, protect_docs=settings.docs == "protected")  # outermost: refuse before reading anything
    return app
