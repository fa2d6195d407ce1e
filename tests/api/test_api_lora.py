"""LoRA adapters over HTTP: loaded and unloaded at run time (vLLM's routes), listed by /v1/models with their parent,
selected by `model` on completions, chat, messages and responses; unknown adapters 404, malformed ones 400 leaving
everything served as it was."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from tests.support.lora import hf_merged, write_adapter
from tests.support.models import hf_greedy, hf_model, load_fp32, random_prompts
from tests.support.servers import engine_idle, make_app, make_engine, wait_ready, wait_until

BASE = "dummy:tiny"  # the name make_app serves the model under
PROMPT = random_prompts(1, 12, 12, seed=11)[0]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory):
    base, root = tiny_checkpoints["llama"], tmp_path_factory.mktemp("lora-api")
    return {"a": write_adapter(base, root / "a", r=4, seed=1), "b": write_adapter(base, root / "b", r=8, seed=2)}


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    engine = make_engine(load_fp32(tiny_checkpoints["llama"]), enable_lora=True, max_loras=2, max_lora_rank=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine, adapters):
    with TestClient(make_app(engine)) as c:
        wait_ready(c.get)
        for name, path in adapters.items():
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            assert r.status_code == 200, r.text
            assert r.json() == {"object": "lora_adapter", "lora_name": name, "status": "loaded", "parent": BASE}
        yield c


def complete(client, model, prompt=PROMPT):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["text"]


def test_models_lists_adapters_with_parent(client, adapters):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards[BASE]["parent"] is None
    for name, path in adapters.items():
        assert (cards[name]["parent"], cards[name]["root"]) == (BASE, str(path))
        assert "chat" in cards[name]["capabilities"]


def test_completion_with_adapter_matches_merged_transformers(client, engine, tiny_checkpoints, adapters):
    base = tiny_checkpoints["llama"]
    for name in ("a", "b"):
        expected = engine.tokenizer.decode(hf_greedy(hf_merged(base, adapters[name]), PROMPT, 8))
        assert complete(client, name) == expected
    assert complete(client, BASE) == engine.tokenizer.decode(hf_greedy(hf_model(base), PROMPT, 8))


def test_concurrent_adapters_and_base(client, engine):
    """Requests for both adapters and the base at once (sharing steps) answer as they do alone."""
    alone = {m: complete(client, m) for m in ("a", "b", BASE)}
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: (m, complete(client, m)), ["a", "b", BASE] * 2))
    assert all(text == alone[m] for m, text in together)
    assert len(set(alone.values())) == 3
    assert wait_until(lambda: engine_idle(engine))  # every KV block back in the pool


def test_every_generating_route_takes_the_adapter(client):
    def chat(model):
        r = client.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 6,
                                                      "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        return r.json()["choices"][0]["message"]["content"]

    text = chat("a")
    assert text != chat(BASE)
    m = client.post("/v1/messages", json={"model": "a", "messages": HI, "max_tokens": 6, "temperature": 0})
    assert m.status_code == 200 and m.json()["model"] == "a", m.text
    assert m.json()["content"][0]["text"] == text
    r = client.post("/v1/responses", json={"model": "a", "input": "hi", "max_output_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "a", r.text
    assert r.json()["output"][0]["content"][0]["text"] == text
    tok = client.post("/tokenize", json={"model": "a", "prompt": "hi"})
    assert tok.status_code == 200


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": HI}),
    ("/v1/responses", {"input": "hi"}),
])
def test_unknown_adapter_is_404(client, route, body):
    r = client.post(route, json={**body, "model": "nope", "max_tokens": 2} if "responses" not in route
                    else {**body, "model": "nope"})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert "'nope' does not exist" in err["message"] and "'a'" in err["message"]


def test_unknown_adapter_on_messages_is_404(client):
    r = client.post("/v1/messages", json={"model": "nope", "messages": HI, "max_tokens": 2})
    assert r.status_code == 404, r.text


def test_adapter_on_a_base_only_route_is_400(client):
    r = client.post("/v1/summarize", json={"model": "a", "input": "some text to summarize"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def test_malformed_load_is_400_and_disturbs_nothing(client, adapters, tmp_path):
    before = complete(client, "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 64, "lora_alpha": 8}')
    for body, message in [({"lora_name": "c", "lora_path": str(bad)}, "over this server's --max-lora-rank 8"),
                          ({"lora_name": "c", "lora_path": str(tmp_path / "none")}, "is not a directory"),
                          ({"lora_name": "a", "lora_path": str(adapters["b"])}, "already loaded"),
                          ({"lora_name": BASE, "lora_path": str(adapters["b"])}, "already names a model")]:
        r = client.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
    assert "c" not in {c["id"] for c in client.get("/v1/models").json()["data"]}
    assert complete(client, "a") == before


def test_unload_then_404_and_reload(client, adapters):
    before = complete(client, "b")
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert client.post("/v1/completions", json={"model": "b", "prompt": "hi"}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 404
    assert "b" not in {c["id"] for c in client.get("/v1/models").json()["data"]}
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["b"])}).status_code \
        == 200
    assert complete(client, "b") == before
