"""Anthropic's Messages API over raw HTTP: response shapes, the streamed event sequence, stop reasons (stop
sequences included), forced tool calls, count_tokens, and errors in Anthropic's shape with their statuses, on the
dummy model; thinking blocks, tool blocks and the engine's failures on scripted answers."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.api import create_app
from server.engine import EngineDeadError, InternalEngineError, QueueFullError, RequestTimeoutError
from tests.support.scripted import ScriptedEngine
from tests.support.servers import make_app, wait_ready

MODEL = "dummy:tiny"
HI = [{"role": "user", "content": "hi"}]
BASE = {"model": MODEL, "max_tokens": 8, "messages": HI}
WEATHER = {"name": "get_weather", "description": "weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}


def error_of(r: httpx.Response, status: int, kind: str) -> str:
    """The message of an Anthropic-shaped error, after checking its status, shape and type."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def sse_events(r) -> list[dict]:
    """The events of an Anthropic SSE stream, each checked to carry its type as the `event:` name too."""
    names, events = [], []
    for line in r.iter_lines():
        if line.startswith("event: "):
            names.append(line[7:])
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    assert names == [e["type"] for e in events]
    return events


def stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def blocks_of(events: list[dict]) -> list[dict]:
    """The content blocks a stream builds (text, thinking and tool input reassembled from their deltas)."""
    blocks, inputs = [], {}
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == len(blocks)
            blocks.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            block, delta = blocks[e["index"]], e["delta"]
            key = {"text_delta": "text", "thinking_delta": "thinking",
                   "input_json_delta": "partial_json"}[delta["type"]]
            if key == "partial_json":
                inputs[e["index"]] = inputs.get(e["index"], "") + delta["partial_json"]
            else:
                block[key] += delta[key]
    for index, text in inputs.items():
        blocks[index]["input"] = json.loads(text)
    return blocks


def test_message_shape_and_usage(client):
    r = client.post("/v1/messages", json={**BASE, "system": "Be brief.", "temperature": 0,
                                          "metadata": {"user_id": "u"}})
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["id"].startswith("msg_") and (m["type"], m["role"], m["model"]) == ("message", "assistant", MODEL)
    assert [b["type"] for b in m["content"]] == ["text"] and m["stop_sequence"] is None
    assert m["stop_reason"] == "max_tokens" and m["usage"]["output_tokens"] == 8
    counted = client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": HI, "system": "Be brief."})
    assert counted.json() == {"input_tokens": m["usage"]["input_tokens"] + m["usage"]["cache_read_input_tokens"]}
    without_system = client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": HI}).json()
    assert without_system["input_tokens"] != counted.json()["input_tokens"]  # the system prompt is in the prompt


def test_stream_event_sequence_matches_the_whole_answer(client):
    body = {**BASE, "temperature": 0}
    whole = client.post("/v1/messages", json=body).json()
    events = stream(client, body)
    types = [e["type"] for e in events]
    assert types[:3] == ["message_start", "content_block_start", "ping"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[3:-3]) == {"content_block_delta"}
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert blocks_of(events) == whole["content"]
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8


def test_stop_sequence_is_cut_and_reported(client):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    body = {**BASE, "max_tokens": 20, "stop_sequences": ["zz", ":"],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    m = client.post("/v1/messages", json=body).json()
    assert m["content"] == [{"type": "text", "text": '{"a"'}]
    assert (m["stop_reason"], m["stop_sequence"]) == ("stop_sequence", ":")
    events = stream(client, body)
    assert blocks_of(events) == m["content"]
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ":"}


def test_forced_tool_use_streamed_and_not(client):
    body = {**BASE, "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather"}}
    m = client.post("/v1/messages", json=body).json()
    (block,) = m["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_") and block["name"] == "get_weather"
    jsonschema.validate(block["input"], WEATHER["input_schema"])
    assert m["stop_reason"] == "tool_use"
    (streamed,) = blocks_of(stream(client, body))
    assert (streamed["name"], streamed["input"]) == ("get_weather", block["input"])


def test_tool_round_trip_conversation_is_accepted(client):
    history = HI + [{"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "12 C"}]}, {"type": "text", "text": "And tomorrow?"}]}]
    r = client.post("/v1/messages", json={**BASE, "messages": history, "tools": [WEATHER],
                                          "tool_choice": {"type": "none"}})
    assert r.status_code == 200 and r.json()["stop_reason"] in ("end_turn", "max_tokens"), r.text
    assert all(b["type"] == "text" for b in r.json()["content"])
    counted = client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": history, "tools": [WEATHER]})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 50


@pytest.mark.parametrize("body, status, kind, needle", [
    ({"model": MODEL, "messages": HI}, 400, "invalid_request_error", "max_tokens"),
    ({**BASE, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({**BASE, "messages": []}, 400, "invalid_request_error", "messages"),
    ({**BASE, "model": "claude-x"}, 404, "not_found_error", "claude-x"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400, "invalid_request_error",
     "image content blocks are not supported"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, 400, "invalid_request_error", "image content blocks"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "invalid_request_error", "video"),
    ({**BASE, "messages": HI + [{"role": "assistant", "content": "The answer is"}]}, 400, "invalid_request_error",
     "prefill"),
    ({**BASE, "tool_choice": {"type": "any"}}, 400, "invalid_request_error", "tool_choice needs tools"),
    ({**BASE, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error",
     "'nope'"),
    ({**BASE, "tools": [WEATHER], "tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "needs `name`"),
    ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error",
     "only custom tools"),
    ({**BASE, "tools": [{"name": "f", "input_schema": {"type": "string"}}]}, 400, "invalid_request_error",
     "type object"),
    ({**BASE, "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ({**BASE, "stop_sequences": [""]}, 400, "invalid_request_error", "stop"),
    ({**BASE, "output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, 400,
     "invalid_request_error", "schema"),
])
def test_errors_in_anthropic_shape(client, body, status, kind, needle):
    assert needle in error_of(client.post("/v1/messages", json=body), status, kind)


def test_malformed_json_and_count_tokens_errors(client):
    r = client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(r, 400, "invalid_request_error")
    r = client.post("/v1/messages/count_tokens", json={"model": "other", "messages": HI})
    error_of(r, 404, "not_found_error")
    error_of(client.post("/v1/messages/count_tokens", json={"messages": HI}), 400, "invalid_request_error")
    orphan = HI + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "12 C"}]}]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):  # a result of no call: refused alike
        assert "toolu_x" in error_of(client.post(path, json={**BASE, "messages": orphan}), 400, "invalid_request_error")
    # the OpenAI routes keep their own shape
    assert set(client.post("/v1/chat/completions", json={"messages": []}).json()) == {"error"}


def test_api_key_header_and_shapes(dummy_engine):
    with TestClient(make_app(dummy_engine, api_key="sekret")) as c:
        wait_ready(c.get)
        assert "missing API key" in error_of(c.post("/v1/messages", json=BASE), 401, "authentication_error")
        r = c.post("/v1/messages", json=BASE, headers={"x-api-key": "wrong"})
        assert error_of(r, 401, "authentication_error") == "incorrect API key"
        for headers in ({"x-api-key": "sekret"}, {"Authorization": "Bearer sekret"}):
            assert c.post("/v1/messages", json=BASE, headers=headers).status_code == 200
            assert c.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": HI},
                          headers=headers).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, headers={"x-api-key": "sekret"})
        assert r.status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": HI}).json()["error"]["code"] == "invalid_api_key"


def test_not_ready_is_overloaded():
    def loader():
        raise RuntimeError("no weights")

    with TestClient(create_app(None, loader=loader)) as c:
        r = c.post("/v1/messages", json=BASE)
        assert "failed to load" in error_of(r, 503, "overloaded_error") and r.headers["retry-after"] == "5"


@pytest.fixture(scope="module")
def scripted(dummy_engine):
    engine = ScriptedEngine(dummy_engine)
    with TestClient(make_app(engine, reasoning_parser="qwen3", retry_after=7)) as c:
        wait_ready(c.get)
        yield c, engine
        engine.error = None


THOUGHT = ["<think>\nThe user", " greets me.", "\n</think>\n\n", "Hello", " there."]


def test_thinking_blocks_whole_and_streamed(scripted):
    client, engine = scripted
    engine.pieces, engine.error = THOUGHT, None
    m = client.post("/v1/messages", json=BASE).json()
    assert m["content"] == [{"type": "thinking", "thinking": "The user greets me.", "signature": ""},
                            {"type": "text", "text": "Hello there."}]
    assert m["stop_reason"] == "end_turn"
    events = stream(client, BASE)
    assert blocks_of(events) == m["content"]
    assert [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"] == \
        ["thinking_delta", "thinking_delta", "text_delta", "text_delta"]
    off = client.post("/v1/messages", json={**BASE, "thinking": {"type": "disabled"}}).json()
    assert off["content"] == [{"type": "text", "text": "".join(THOUGHT)}]


def test_text_then_tool_blocks(scripted):
    client, engine = scripted
    engine.pieces, engine.error = ["</think>Checking. ", '<tool_call>\n{"name": "get_weather", ',
                                   '"arguments": {"city": "Oslo"}}\n</tool_call>'], None
    body = {**BASE, "tools": [WEATHER]}
    m = client.post("/v1/messages", json=body).json()
    assert [b["type"] for b in m["content"]] == ["text", "tool_use"] and m["stop_reason"] == "tool_use"
    assert m["content"][0]["text"] == "Checking." and m["content"][1]["input"] == {"city": "Oslo"}
    events = stream(client, body)
    streamed = blocks_of(events)
    assert [b["type"] for b in streamed] == ["text", "tool_use"] and streamed[1]["input"] == {"city": "Oslo"}
    assert streamed[0]["text"] == "Checking." and streamed[1]["name"] == "get_weather"


@pytest.mark.parametrize("error, status, kind", [
    (QueueFullError("queue full"), 429, "rate_limit_error"),
    (EngineDeadError("stopped"), 503, "overloaded_error"),
    (RequestTimeoutError("too slow"), 504, "timeout_error"),
    (InternalEngineError("boom"), 500, "api_error"),
])
def test_engine_failures_before_and_during_a_stream(scripted, error, status, kind):
    client, engine = scripted
    engine.pieces, engine.error, engine.error_after = ["a", "b"], error, 0
    r = client.post("/v1/messages", json=BASE)
    error_of(r, status, kind)
    if status == 429:
        assert r.headers["retry-after"] == "7"
    error_of(client.post("/v1/messages", json={**BASE, "stream": True}), status, kind)
    engine.error_after = 1  # after the headers: an `error` event ends the stream
    events = stream(client, BASE)
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == kind
    engine.error = None
