"""`--models-dir`: two tiny GGUFs and a broken file served by name beside the default (dummy) model. First use loads
(once, however many requests race for it), `max_loaded_models=1` unloads the least recently used model only after
its running request has finished, an idle model unloads by itself, /v1/models shows each state, a request's deadline
bounds its wait for a load, and a file that fails to load answers a clear error for that model only. Memory (on a
pretend machine): a model that would not fit beside the loaded ones unloads them first, one that cannot fit alone is
a 503 that disturbs nothing."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from server.api import ServerSettings, create_app
from server.cli.models_dir import DirectoryModels
from server.engine import EngineSettings
from server.model import KVCache, ModelSettings
from server.model.config import ModelConfig
from server.model.weights.gguf import hf_config
from server.model.weights.gguf_file import read_header
from tests.support.gguf_files import write_gguf
from tests.support.servers import wait_ready


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_gguf(root / "alpha.gguf", "llama", {"default": "Q8_0"}, seed=1, keep_floats=False)
    write_gguf(root / "beta.gguf", "llama", {"default": "Q8_0"}, seed=2, keep_floats=False)
    (root / "broken.gguf").write_bytes(b"GGUF but not really")
    (root / "notes.txt").write_text("not a model")
    return root


class CountingOpener(DirectoryModels):
    """The CLI's opener, counting loads per model and optionally slowed down (to catch requests mid-load)."""

    def __init__(self, delay: float = 0.0):
        super().__init__(ModelSettings(dtype="float32", kernel_calibration=False),
                         EngineSettings(num_kv_blocks=160, max_model_len=2048, max_num_seqs=8))
        self.delay, self.calls = delay, []

    def open(self, name: str, path: str):
        self.calls.append(name)
        time.sleep(self.delay)
        return super().open(name, path)


def pool_client(dummy_engine, models_dir, opener, **settings) -> TestClient:
    app = create_app(dummy_engine, ServerSettings(models_dir=models_dir, **settings), "dummy:tiny",
                     dummy_engine.tokenizer, shutdown_engine=False, model_opener=opener)
    return TestClient(app)


@pytest.fixture(scope="module")
def opener():
    return CountingOpener(delay=0.3)


@pytest.fixture(scope="module")
def client(dummy_engine, models_dir, opener):
    with pool_client(dummy_engine, models_dir, opener, max_loaded_models=1) as c:
        wait_ready(c.get)
        yield c


def states(c: TestClient) -> dict[str, str | None]:
    return {m["id"]: m.get("state") for m in c.get("/v1/models").json()["data"]}


def complete(c: TestClient, model: str | None, max_tokens: int = 3, **extra):
    body = {"prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return c.post("/v1/completions", json=body if model is None else {**body, "model": model})


def test_directory_listed_unloaded_then_first_use_loads_once(client, opener):
    assert states(client) == {"dummy:tiny": "loaded", "alpha": "unloaded", "beta": "unloaded",
                              "broken": "unloaded"}
    results = []
    threads = [threading.Thread(target=lambda: results.append(complete(client, "alpha"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200, 200]
    assert {r.json()["model"] for r in results} == {"alpha"}
    assert opener.calls == ["alpha"]  # three racing first requests, one load
    assert states(client)["alpha"] == "loaded"
    no_model = complete(client, None)  # a request naming no model goes to the default one
    assert no_model.status_code == 200 and no_model.json()["model"] == "dummy:tiny"


def test_lru_unloads_only_after_its_running_request_finishes(client, opener):
    assert complete(client, "alpha").status_code == 200
    pool = client.app.state.lifecycle.pool
    done: dict[str, tuple[float, object]] = {}

    def run(model: str, max_tokens: int) -> None:
        r = complete(client, model, max_tokens)
        done[model] = (time.monotonic(), r)

    long = threading.Thread(target=run, args=("alpha", 400))
    long.start()
    while pool.entries["alpha"].inflight == 0:
        time.sleep(0.002)
    switch = threading.Thread(target=run, args=("beta", 3))
    switch.start()
    while pool.entries["alpha"].state == "loaded":
        time.sleep(0.002)
    assert (pool.entries["alpha"].state, pool.entries["alpha"].inflight) == ("unloading", 1)
    long.join()
    switch.join()
    (alpha_end, alpha), (beta_end, beta) = done["alpha"], done["beta"]
    assert alpha.status_code == 200 and alpha.json()["usage"]["completion_tokens"] == 400  # nothing lost
    assert beta.status_code == 200 and beta.json()["model"] == "beta"
    assert beta_end > alpha_end
    assert {k: v for k, v in states(client).items() if k in ("alpha", "beta")} == {"alpha": "unloaded",
                                                                                   "beta": "loaded"}


def test_a_broken_file_fails_that_model_only(client, opener):
    assert states(client)["beta"] == "loaded"
    r = complete(client, "broken")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and err["param"] == "model"
    assert err["message"].startswith("the model 'broken' failed to load from ") and "broken.gguf" in err["message"]
    assert err["message"].endswith("broken.gguf: GGUF version 1953849888 is not supported (2 and 3 are)")
    assert states(client)["broken"] == "unloaded"
    assert states(client)["beta"] == "loaded"  # refused from its header: nothing was unloaded to make room for it
    assert "broken" not in opener.calls
    assert complete(client, None).status_code == 200
    assert complete(client, "beta").status_code == 200


def test_unknown_model_lists_the_directory(client):
    r = complete(client, "gamma")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == ("the model 'gamma' does not exist; this server serves 'dummy:tiny', "
                                            "'alpha', 'beta', 'broken'")


def test_deadline_bounds_the_wait_for_a_load(client):
    pool = client.app.state.lifecycle.pool
    r = complete(client, "alpha", timeout=0.05)  # alpha is not loaded: its load takes over 0.3 s
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "request_timeout"
    assert pool.entries["alpha"].state in ("loading", "loaded")  # the load goes on for the next request
    assert complete(client, "alpha").status_code == 200


def test_idle_model_unloads_by_itself(dummy_engine, models_dir):
    with pool_client(dummy_engine, models_dir, CountingOpener(), model_idle_unload=0.3) as c:
        wait_ready(c.get)
        assert complete(c, "beta").status_code == 200
        assert states(c)["beta"] == "loaded"
        deadline = time.monotonic() + 5
        while states(c)["beta"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states(c)["beta"] == "unloaded"
        assert complete(c, "beta").status_code == 200  # and loads again on the next request


def test_a_stopped_engine_is_reloaded_and_others_keep_serving(client, opener):
    pool = client.app.state.lifecycle.pool
    assert complete(client, "beta").status_code == 200
    r = client.post("/tokenize", json={"model": "beta", "prompt": "Hello"})  # outside /v1: still released
    assert r.status_code == 200 and r.json()["max_model_len"] == 2048
    assert pool.entries["beta"].inflight == 0
    pool.entries["beta"].served.engine.shutdown()  # as if its step loop had died
    assert complete(client, None).status_code == 200  # the default model is untouched
    loads = opener.calls.count("beta")
    r = complete(client, "beta")
    assert r.status_code == 200 and r.json()["model"] == "beta"
    assert opener.calls.count("beta") == loads + 1


class MemoryOpener(CountingOpener):
    """A machine of `total` bytes in which the loaded directory models take their estimate and nothing else."""

    def __init__(self, total: int = 0):
        super().__init__()
        self.total, self.pool = total, None

    def available_bytes(self) -> int:
        return self.total - sum(e.resident for e in self.pool.entries.values() if e.state == "loaded")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_memory_estimate_is_weights_times_factor_plus_kv_cache(models_dir):
    header, opener = read_header(models_dir / "alpha.gguf"), CountingOpener()
    cfg = ModelConfig.from_dict(hf_config(header))
    kv = 160 * KVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    weights = int(header.tensor_bytes() * opener.model_settings.weight_memory)  # --weight-memory, 1.3 by default
    assert opener.resident_bytes(str(models_dir / "alpha.gguf")) == weights + kv


def test_a_load_unloads_for_memory_and_refuses_what_cannot_fit(dummy_engine, models_dir):
    opener = MemoryOpener()
    size = opener.resident_bytes(str(models_dir / "alpha.gguf"))  # beta has the same shape and types
    logged, api_log = Records(), logging.getLogger("loom.api")
    api_log.addHandler(logged)
    old_level = api_log.level
    api_log.setLevel(logging.INFO)
    try:
        with pool_client(dummy_engine, models_dir, opener, max_loaded_models=2, model_memory_headroom=0) as c:
            wait_ready(c.get)
            opener.pool, opener.total = c.app.state.lifecycle.pool, size * 3 // 2  # room for one, not two
            assert complete(c, "alpha").status_code == 200
            assert complete(c, "beta").status_code == 200  # two fit under max_loaded_models, not in memory
            assert {k: states(c)[k] for k in ("alpha", "beta")} == {"alpha": "unloaded", "beta": "loaded"}
            (unload,) = [r for r in logged.records if r.getMessage().startswith("unloading the least recently")]
            assert (unload.model, getattr(unload, "for"), unload.reason) == ("alpha", "beta", "memory")
            assert (unload.model_bytes, unload.needed_bytes, unload.available_bytes) == (size, size, size // 2)
            opener.total = size * 9 // 10  # now not even alone
            r = complete(c, "alpha")
            assert r.status_code == 503
            assert r.json()["error"] == {
                "message": f"the model 'alpha' needs about {size / 2 ** 30:.2f} GiB of memory (weights and KV "
                           f"cache) but only {size * 9 // 10 / 2 ** 30:.2f} GiB could be free with every other "
                           f"directory model unloaded (keeping 0.00 GiB of headroom)",
                "type": "service_unavailable", "param": "model", "code": "insufficient_memory"}
            assert {k: states(c)[k] for k in ("alpha", "beta")} == {"alpha": "unloaded", "beta": "loaded"}
            assert complete(c, "beta").status_code == 200 and complete(c, None).status_code == 200
    finally:
        api_log.removeHandler(logged)
        api_log.setLevel(old_level)
