"""Completions and chat through the official `openai` client and raw HTTP, against an in-process app over the dummy
model: response shapes, streaming format, n, stop, seed, logprobs, echo, usage."""
from __future__ import annotations

import json

import openai
import pytest


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final [DONE]."""
    lines = [line for line in response.text.splitlines() if line.strip()]
    assert all(line.startswith("data: ") for line in lines if not line.startswith(":")), lines[:3]
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_models(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["dummy:tiny"]


def test_completion_usage_and_choices(oai):
    r = oai.completions.create(model="dummy:tiny", prompt=["one", "two three"], max_tokens=4, n=2, temperature=1.0,
                               seed=1)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == 1 + 2 and r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_token_id_prompts(oai):
    r = oai.completions.create(model="dummy:tiny", prompt=[[1, 2, 3], [4, 5]], max_tokens=2, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5


def test_seed_reproduces(oai):
    kw = {"model": "dummy:tiny", "prompt": "seeded", "max_tokens": 6, "temperature": 1.0, "seed": 1234}
    assert oai.completions.create(**kw).choices[0].text == oai.completions.create(**kw).choices[0].text


def test_stop_string_truncates(oai):
    kw = {"model": "dummy:tiny", "messages": [{"role": "user", "content": "stop test"}], "temperature": 1.0,
          "seed": 7}
    full = oai.chat.completions.create(max_tokens=12, **kw).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    r = oai.chat.completions.create(max_tokens=12, stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.message.content == full[:full.index(stop)]


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model="dummy:tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 3
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token  # partial characters: their true bytes
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy: the pick is the most likely


def test_echo_scores_the_prompt(oai):
    """echo + logprobs + max_tokens 0: prompt token logprobs only (perplexity scoring)."""
    r = oai.completions.create(model="dummy:tiny", prompt="The cat sat on the mat", max_tokens=0, echo=True,
                               logprobs=1)
    c = r.choices[0]
    assert c.text == "The cat sat on the mat" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and "".join(lp.tokens) == c.text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_echo_with_generation(oai):
    r = oai.completions.create(model="dummy:tiny", prompt="Hello", max_tokens=3, echo=True, logprobs=0,
                               temperature=0)
    c = r.choices[0]
    assert c.text.startswith("Hello") and len(c.logprobs.tokens) == 1 + 3
    assert c.logprobs.token_logprobs[0] is None


def test_chat_stream_openai_client(oai):
    stream = oai.chat.completions.create(model="dummy:tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, n=2, temperature=1.0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    per_choice: dict[int, list] = {0: [], 1: []}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        per_choice[ch.choices[0].index].append(ch.choices[0])
    for seq in per_choice.values():
        assert seq[0].delta.role == "assistant"
        assert seq[-1].finish_reason in ("stop", "length")
        assert all(c.finish_reason is None for c in seq[:-1])
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens > 0
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


def test_completion_stream_raw_sse(client):
    body = {"prompt": ["a", "b"], "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "\n\n" in r.text and r.text.rstrip().endswith("data: [DONE]")
    events = sse_events(r)
    texts: dict[int, str] = {}
    finish = {}
    for e in events[:-1]:
        assert e["object"] == "text_completion" and e["usage"] is None
        c = e["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        assert len(c["logprobs"]["tokens"]) == len(c["logprobs"]["token_logprobs"])
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert set(finish) == {0, 1} and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    plain = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert [c["text"] for c in plain["choices"]] == [texts[0], texts[1]]


def test_stream_without_usage_has_no_usage_chunk(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                                  "stream": True})
    events = sse_events(r)
    assert all("usage" not in e for e in events) and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_multi_part_content_and_system_messages(oai):
    r = oai.chat.completions.create(model="dummy:tiny", max_tokens=2, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}])
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 10


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/summarize", "/v1/classify", "/v1/models", "/health",
              "/ready", "/metrics"):
        assert p in paths
