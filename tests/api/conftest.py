"""Fixtures for the HTTP layer.

Most tests run an in-process app over the `dummy:tiny` model (random weights, real tokenizer): fast, and good for
shapes, errors and plumbing. Tests that need real sockets (client disconnects) run uvicorn in a thread. Only the
end-to-end tests (marked `slow`) start a real `loom serve` of the default model, once per session.
"""
from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.support.servers import free_port, make_app, start_loom_serve, stop, wait_ready


@pytest.fixture(scope="module")
def client(dummy_engine):
    """An in-process app over the shared dummy engine, started (lifespan, warm-up) and ready."""
    with TestClient(make_app(dummy_engine)) as c:
        wait_ready(c.get)
        yield c


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """`loom serve --model default` (bf16 where the CPU has it, as the server defaults) on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "loom-serve.log"
    proc = start_loom_serve(["--model", "default", "--kv-cache-memory", "0.5", "--max-num-seqs", "64"], port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a first start on a loaded 2-core CI machine builds and calibrates
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"loom serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            raise TimeoutError(f"loom serve never became ready:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        code = stop(proc)
        assert code == 0, f"loom serve exited with {code} on SIGTERM:\n{log.read_text()[-3000:]}"
