"""/tokenize, /detokenize (vLLM's shapes) and /version on the dummy model's real tokenizer."""
from __future__ import annotations

import pytest

TEXT = "naïve café — 日本語のテキスト 🚀🧵 done"


def test_tokenize_detokenize_round_trip_on_multibyte_text(client, dummy_engine):
    r = client.post("/tokenize", json={"prompt": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == dummy_engine.tokenizer.encode(TEXT)
    assert body["count"] == len(body["tokens"]) > len(TEXT.split())
    assert body["max_model_len"] == dummy_engine.max_model_len == 512
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}


def test_tokenize_messages_uses_the_chat_template(client, dummy_engine):
    messages = [{"role": "user", "content": TEXT}]
    body = client.post("/tokenize", json={"messages": messages}).json()
    assert body["tokens"] == dummy_engine.tokenizer.encode_chat(messages)
    text = client.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and TEXT in text
    bare = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]


def test_chat_template_kwargs_reach_the_template(client, dummy_engine, monkeypatch):
    """Qwen3's template renders an empty think block when `enable_thinking` is false; the kwargs get there."""
    hf = dummy_engine.tokenizer.hf
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
                "<think>\n\n</think>\n\n{% endif %}")
    monkeypatch.setattr(hf, "chat_template", template)
    messages = [{"role": "user", "content": "hi"}]
    plain = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    off = client.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}})
    text = client.post("/detokenize", json={"tokens": off.json()["tokens"]}).json()["prompt"]
    assert text.endswith("<think>\n\n</think>\n\n") and off.json()["count"] > len(plain)
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == off.json()["count"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [5, 10 ** 9]}, "tokens.1"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
])
def test_bad_tokenize_requests(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    if param:
        assert r.json()["error"]["param"] == param


def test_version(client):
    from importlib.metadata import version
    assert client.get("/version").json() == {"version": version("loom-serve")}
