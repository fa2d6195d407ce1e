"""Engines and apps over the dummy model, readiness waits, servers in a thread or in a subprocess, SSE reading."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from server.api import ServerSettings, create_app
from server.engine import AsyncEngine, EngineCore, EngineSettings
from server.tasks import TaskSettings
from tests.support.ports import free_port  # re-exported: servers and their ports go together

LOOM = str(Path(sys.executable).with_name("loom"))


def make_engine(lm, encoders=None, **overrides) -> AsyncEngine:
    settings = {"num_kv_blocks": 256, "max_model_len": 512, "max_num_seqs": 32, **overrides}
    return AsyncEngine(EngineCore(lm, EngineSettings(**settings)), encoders=encoders)


def engine_idle(engine: AsyncEngine) -> bool:
    """Nothing running or waiting, and every KV block back in the pool."""
    s = engine.stats()
    return s.running == 0 and s.waiting == 0 and s.free_blocks == s.num_blocks


def make_app(engine: AsyncEngine, **settings):
    """An app over `engine`; `settings` are ServerSettings or TaskSettings fields (each goes where it belongs)."""
    unknown = set(settings) - set(ServerSettings.model_fields) - set(TaskSettings.model_fields)
    assert not unknown, f"not a setting: {unknown}"
    server = ServerSettings(**{k: v for k, v in settings.items() if k in ServerSettings.model_fields})
    tasks = TaskSettings(**{k: v for k, v in settings.items() if k in TaskSettings.model_fields})
    return create_app(engine, server, "dummy:tiny", engine.tokenizer, task_settings=tasks, shutdown_engine=False)


def wait_ready(get, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the server never became ready")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()



class ThreadServer:
    """uvicorn on a free port in a background thread (real sockets, so client disconnects are real)."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_ready(lambda path: httpx.get(self.url + path, timeout=5))
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_loom_serve(args: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "LOOM_LOG_LEVEL": "warning", **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen([LOOM, "serve", "--host", "127.0.0.1", "--port", str(port), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    return proc.returncode


async def sse_chunks(response):
    """The JSON chunks of an OpenAI-style SSE stream (`data: {...}` lines), up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        yield json.loads(line[6:])
