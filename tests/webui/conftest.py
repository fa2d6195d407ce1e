"""Fixtures for the playground's tests: a real server (uvicorn in a thread) over the `dummy:tiny` model, one with
all-MiniLM-L6-v2 beside it (the Embeddings tab), and headless Chromium. The engine is paced (a short sleep after each
step, which costs no CPU) so an answer takes a few seconds to stream: long enough to watch it grow and to stop it
midway, on any machine.

Without Debian's chromium and chromium-driver the browser tests skip, naming the install command; with
LOOM_REQUIRE_CHROMIUM=1 (set by .ci/run) they fail instead, so CI can never skip them silently."""
from __future__ import annotations

import os
import time

import pytest

from server.engine import EncoderBatcher
from tests.support.browser import chromium_missing, start_chromium
from tests.support.servers import ThreadServer, make_app, make_engine

STEP_PAUSE = 0.02  # seconds after each engine step: ~40 tokens/s for one answer
API_KEY = "playground-test-key"


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium, one for the session (pages are reloaded per test)."""
    reason = chromium_missing()
    if reason:
        if os.environ.get("LOOM_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    driver = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def paced_engine(dummy_lm):
    engine = make_engine(dummy_lm, max_model_len=2048, num_kv_blocks=512)
    engine.add_step_observer(lambda _step: time.sleep(STEP_PAUSE))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(paced_engine):
    with ThreadServer(make_app(paced_engine, summarize_max_tokens=16, classify_permutations=1)) as s:
        yield s.url


@pytest.fixture(scope="module")
def keyed_server(paced_engine):
    """(url, key) of a server that wants an API key on /v1."""
    with ThreadServer(make_app(paced_engine, api_key=API_KEY, classify_permutations=1)) as s:
        yield s.url, API_KEY


@pytest.fixture(scope="module")
def encoder_server(dummy_lm, minilm_fp32):
    """A server with an embedding model (all-MiniLM-L6-v2, as `--embedding-model default` serves it)."""
    engine = make_engine(dummy_lm, encoders=EncoderBatcher({minilm_fp32.name: minilm_fp32}))
    with ThreadServer(make_app(engine)) as s:
        yield s.url
    engine.shutdown()
