"""Start-up and shutdown. The model loads in the background (so /health answers and /ready says 503 meanwhile); once
it is there, `Lifecycle.attach` builds what the routes serve (`ServedModel`: engine, tokenizer, the task objects),
warms it up and readiness turns on. SIGTERM drains: /ready fails, new requests are refused, in-flight ones get the
drain timeout, then the rest are aborted."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError
from server.api.metrics import Metrics
from server.api.settings import ServerSettings
from server.api.tracking import RequestTracker
from server.engine import AsyncEngine, SamplingParams
from server.model import LoadedEncoder, Tokenizer
from server.model.lora import LoraAdapter
from server.tasks import Classifier, Summarizer, TaskSettings

if TYPE_CHECKING:
    from server.api.model_pool import ModelPool

log = logging.getLogger("loom.api")

Loader = Callable[[], tuple[AsyncEngine, str, Tokenizer]]  # blocking: returns (engine, model name, tokenizer)


@dataclass
class ServedModel:
    """What the /v1 routes serve, built once when the model is attached."""
    engine: AsyncEngine
    name: str
    tokenizer: Tokenizer
    max_model_len: int
    summarizer: Summarizer
    classifier: Classifier  # keeps its calibration cache across requests
    created: int
    encoders: dict[str, LoadedEncoder] = field(default_factory=dict)  # embedding / classifier models by name
    tool_call_parser: str | None = None  # --tool-call-parser (None: the chat template's format)
    tracker: RequestTracker | None = None  # a --models-dir model's own (None: the app's)
    siblings: Callable[[], list[str]] = list  # the other models served here (--models-dir), for the 404's list

    def check_model(self, model: str | None) -> None:
        """The base model only (routes that do not run adapters: summarize, classify)."""
        if self.resolve_model(model) is not None:
            raise APIError(400, f"{model!r} is a LoRA adapter; adapters serve completions, chat, messages and "
                                f"responses, not this route", param="model", code="model_not_supported")

    def answered_by(self, params: SamplingParams) -> str:
        """The `model` an answer names: its adapter's name, else the base model's."""
        return params.lora.name if params.lora is not None else self.name

    def resolve_model(self, model: str | None) -> LoraAdapter | None:
        """The LoRA adapter `model` names, or None for the base model; 404 for any other name."""
        if model is None or model == self.name:
            return None
        adapter = self.engine.loras.get(model)
        if adapter is None:
            known = [self.name] + [a.name for a in self.engine.loras.adapters()] + self.siblings()
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{', '.join(repr(k) for k in known)}", param="model", code="model_not_found")
        return adapter


class Lifecycle:
    def __init__(self, settings: ServerSettings, task_settings: TaskSettings, tracker: RequestTracker,
                 metrics: Metrics):
        self.settings, self.task_settings, self.tracker, self.metrics = settings, task_settings, tracker, metrics
        self.model: ServedModel | None = None
        self.load_error: str | None = None
        self.warmed_up = False
        self.draining = False  # SIGTERM: /ready fails, new requests are refused, in-flight ones finish
        self.pool: ModelPool | None = None  # --models-dir: the models served beside the default one
        self.trackers = [tracker]  # the app's, then each --models-dir model's

    def attach(self, engine: AsyncEngine, name: str, tokenizer: Tokenizer) -> ServedModel:
        self.model = self.build_served(engine, name, tokenizer, self.tracker)
        self.tracker.engine, self.tracker.model = engine, name
        self.metrics.watch(engine)
        return self.model

    def build_served(self, engine: AsyncEngine, name: str, tokenizer: Tokenizer,
                     tracker: RequestTracker) -> ServedModel:
        t = self.task_settings
        generate = tracker.generate
        return ServedModel(
            engine=engine, name=name, tokenizer=tokenizer, max_model_len=engine.max_model_len,
            summarizer=Summarizer(functools.partial(generate, endpoint="summarize"), tokenizer,
                                  engine.max_model_len, chunk_tokens=t.summarize_chunk_tokens,
                                  max_tokens=t.summarize_max_tokens, max_input_chars=t.summarize_max_input_chars),
            classifier=Classifier(functools.partial(generate, endpoint="classify"), tokenizer,
                                  engine.max_model_len, permutations=t.classify_permutations),
            created=int(time.time()), encoders=dict(engine.encoders),
            tool_call_parser=self.settings.tool_call_parser, tracker=tracker,
            siblings=lambda: [n for n in (self.pool.entries if self.pool else ()) if n != name])

    def build_pooled(self, engine: AsyncEngine, name: str, tokenizer: Tokenizer) -> ServedModel:
        """A --models-dir model: its own tracker (the drain waits for and aborts its requests too)."""
        tracker = RequestTracker(self.metrics, self.settings.request_timeout)
        tracker.engine, tracker.model = engine, name
        self.trackers.append(tracker)
        return self.build_served(engine, name, tokenizer, tracker)

    async def served_for(self, request: Request) -> ServedModel:
        """The model a /v1 request names in its body's `model`: the default one, or a --models-dir model (loaded
        first if need be, held until the request's last byte)."""
        default = self.require_ready()
        if self.pool is None:
            return default
        memo = request.scope.get("loom.served")
        if memo is not None:
            return memo
        name = await requested_model(request)
        served = default
        if name is not None and name != default.name and name in self.pool:
            served, release = await self.pool.acquire(name, self.tracker.deadline(await requested_timeout(request)))
            request.scope.setdefault("loom.release", []).append(release)
        request.scope["loom.served"] = served
        return served

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        if self.model is None:
            return "the model is still loading"
        engine = self.model.engine
        live = engine.liveness()
        if not engine.healthy:
            return f"the engine has stopped: {live.error!r}"
        if not self.warmed_up:
            return "the model is warming up"
        stalled = time.monotonic() - live.last_step_time
        if stalled > self.settings.ready_stall_seconds:
            return f"the engine loop has not stepped for {stalled:.0f} s"
        return None

    def dead_reason(self) -> str | None:
        """Why this process can no longer serve and should be restarted (its engine loop has stopped while the server
        is not shutting down); None while it is alive, loading or draining."""
        if self.model is None or self.draining:
            return None
        live = self.model.engine.liveness()
        return None if live.alive else f"the engine has stopped: {live.error!r}"

    def require_ready(self) -> ServedModel:
        reason = self.not_ready_reason()
        if reason:
            raise APIError(503, reason, code="not_ready", headers={"Retry-After": "5"})
        return self.model

    async def warmup(self) -> None:
        """One short greedy request, so the first client does not pay for lazy initialisation."""
        if self.settings.warmup:
            prompt = self.model.tokenizer.encode("Hello, world")[:8] or [0]
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            async for _ in self.model.engine.generate(prompt, params, request_id="warmup"):
                pass
            for enc in self.model.encoders.values():
                await self.model.engine.encode(enc.name, enc.encode_texts(["Hello, world"]), f"warmup-{enc.name}")
        self.warmed_up = True
        log.info("ready", extra={"model": self.model.name})
        self.model.engine.warm_grammars()  # after ready: off the start's critical path

    async def drain(self, timeout: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Graceful shutdown: wait up to `timeout` for in-flight work (less if `hurry()` turns true: a second
        signal), then abort what is left."""
        self.draining = True
        tracker = self.tracker
        deadline = time.monotonic() + timeout
        while (tracker.http_inflight or any(t.active for t in self.trackers)) and time.monotonic() < deadline \
                and not hurry():
            await asyncio.sleep(0.05)
        aborted = sum(t.abort_all() for t in self.trackers)
        if aborted:
            log.warning("drain timeout: aborting requests", extra={"count": aborted})
        grace = time.monotonic() + 5.0  # let aborted responses send their last chunk
        while tracker.http_inflight and time.monotonic() < grace:
            await asyncio.sleep(0.05)


def make_lifespan(lifecycle: Lifecycle, loader: Loader | None, on_fatal: Callable[[str], None] | None = None,
                  shutdown_engine: bool = True):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        lifecycle.draining, lifecycle.tracker.accepting = False, True  # (re)started: open for work

        async def start() -> None:
            try:
                if lifecycle.model is None and loader is not None:
                    lifecycle.attach(*await asyncio.to_thread(loader))
                if lifecycle.model is not None:
                    await lifecycle.warmup()
            except Exception as exc:  # /ready reports it; the CLI exits non-zero
                log.exception("model load or warmup failed")
                lifecycle.load_error = f"{type(exc).__name__}: {exc}"
                if on_fatal:
                    on_fatal(lifecycle.load_error)

        tasks = [asyncio.create_task(start())]
        pool = lifecycle.pool
        if pool is not None and pool.idle_unload > 0:
            tasks.append(asyncio.create_task(pool.unload_idle()))
        try:
            yield
        finally:
            lifecycle.draining = True
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if shutdown_engine and lifecycle.model is not None:
                await asyncio.to_thread(lifecycle.model.engine.shutdown)
            if pool is not None:
                await asyncio.to_thread(pool.shutdown)

    return lifespan


class InflightMiddleware:
    """Counts /v1 requests from their start to the last byte sent (SSE streams included), and then releases the
    --models-dir model a request held (/tokenize and /detokenize hold one too)."""

    def __init__(self, app: ASGIApp, tracker: RequestTracker):
        self.app, self.tracker = app, tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = int(scope["type"] == "http" and scope.get("path", "").startswith("/v1/"))
        self.tracker.http_inflight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.http_inflight -= counted
            for release in scope.get("loom.release", ()):
                release()


async def requested_model(request: Request) -> str | None:
    """The `model` a POST's JSON body names (None without one: the route's own validation answers bad bodies)."""
    body = await json_body(request)
    model = body.get("model")
    return model if isinstance(model, str) else None


async def requested_timeout(request: Request) -> float | None:
    timeout = (await json_body(request)).get("timeout")
    return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None


async def json_body(request: Request) -> dict:
    if request.method != "POST":
        return {}
    try:
        body = await request.json()  # cached on the request: the route's own parsing reads it again for free
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
