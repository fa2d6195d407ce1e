"""The official `anthropic` client, unchanged, against a running server over the dummy model: messages.create,
messages.stream (its text equals the final message's), count_tokens, a forced tool call whose input validates
against its schema, a tool round trip, a structured answer, and the client's typed errors."""
from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from tests.support.servers import ThreadServer, make_app

MODEL = "dummy:tiny"
HI = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}


@pytest.fixture(scope="module")
def server(dummy_engine):
    with ThreadServer(make_app(dummy_engine, api_key="sekret")) as s:
        yield s


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0)


def test_create_and_count_tokens(claude):
    # this client version has no sampling arguments (newer Claude models take none): they go in the body
    m = claude.messages.create(model=MODEL, max_tokens=12, messages=HI, system="Answer briefly.",
                               stop_sequences=["\n\n\n"], metadata={"user_id": "u1"},
                               extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40})
    assert isinstance(m, anthropic.types.Message) and m.role == "assistant" and m.model == MODEL
    assert m.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
    assert [b.type for b in m.content] in (["text"], [])
    assert 0 < m.usage.output_tokens <= 12
    counted = claude.messages.count_tokens(model=MODEL, messages=HI, system="Answer briefly.")
    assert counted.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_stream_text_equals_final_and_unstreamed_text(claude):
    kw = dict(model=MODEL, max_tokens=16, messages=HI, extra_body={"temperature": 0})
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_forced_tool_call_validates_and_round_trips(claude):
    kw = dict(model=MODEL, max_tokens=80, tools=[WEATHER], extra_body={"temperature": 0})
    m = claude.messages.create(**kw, messages=HI, tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    (call,) = m.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    with claude.messages.stream(**kw, messages=HI, tool_choice={"type": "any"}) as s:
        partial = "".join(e.partial_json for e in s if e.type == "input_json")
        streamed = s.get_final_message()
    assert streamed.content[0].input == call.input == json.loads(partial)
    history = HI + [{"role": "assistant", "content": m.content},  # the client's own blocks, as its docs do
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": json.dumps({"temperature": 12, "sky": "clear"})}]}]
    final = claude.messages.create(**kw, messages=history, tool_choice={"type": "none"})
    assert final.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in final.content)


def test_structured_answer(claude):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    m = claude.messages.create(model=MODEL, max_tokens=20, messages=HI,
                               extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert m.stop_reason == "end_turn"
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_typed_errors(claude, server):
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=HI)
    assert err.value.status_code == 404 and err.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert err.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages.0.content.0: image content blocks are not supported: this server's model reads text only"}}
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.count_tokens(
            model=MODEL, messages=HI)
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "incorrect API key"}}
