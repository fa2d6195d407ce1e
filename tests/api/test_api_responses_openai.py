"""The Responses API through the official `openai` client against a running server (uvicorn in a thread, over the
dummy model): create, stream (streamed text == final text), a json_schema answer, a forced function call whose
arguments fit its schema, a function_call_output round trip through previous_response_id, retrieve and delete."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.support.servers import ThreadServer, make_app

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": WEATHER_SCHEMA, "strict": True}
GREEDY = {"model": "dummy:tiny", "temperature": 0}


@pytest.fixture(scope="module")
def oai(dummy_engine):
    with ThreadServer(make_app(dummy_engine)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_create_text(oai):
    r = oai.responses.create(input="Say hi", instructions="be brief", max_output_tokens=5, metadata={"a": "b"},
                             **GREEDY)
    assert r.object == "response" and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (message,) = r.output
    assert message.type == "message" and message.content[0].type == "output_text"
    assert r.output_text == message.content[0].text and r.metadata == {"a": "b"}
    assert r.usage.output_tokens == 5 and r.usage.total_tokens == r.usage.input_tokens + 5


def test_stream_text_equals_final_text(oai):
    """A short schema makes the random model finish (the client's stream helper wants response.completed)."""
    kw = {"input": [{"role": "developer", "content": "answer in JSON"},
                    {"role": "user", "content": [{"type": "input_text", "text": "Name a colour"}]}],
          "text": {"format": {"type": "json_schema", "name": "colour", "schema": {
              "type": "object", "properties": {"colour": {"type": "string", "maxLength": 6}},
              "required": ["colour"], "additionalProperties": False}}},
          "max_output_tokens": 60, **GREEDY}
    with oai.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.status == "completed" and set(json.loads(final.output_text)) == {"colour"}
    assert deltas == final.output_text == oai.responses.create(**kw).output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"


def test_create_stream_of_a_cut_answer(oai):
    kw = {"input": "Tell me a story", "max_output_tokens": 8, **GREEDY}
    events = list(oai.responses.create(stream=True, **kw))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == oai.responses.create(**kw).output_text


def test_json_schema_output_validates(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oai.responses.create(input="A person as JSON", max_output_tokens=80, text={"format": {
        "type": "json_schema", "name": "person", "schema": schema, "strict": True}}, **GREEDY)
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_forced_function_call_validates_streamed_and_not(oai):
    kw = {"input": "Weather in Oslo?", "tools": [WEATHER], "max_output_tokens": 100,
          "tool_choice": {"type": "function", "name": "get_weather"}, **GREEDY}
    r = oai.responses.create(**kw)
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    with oai.responses.stream(**kw) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    (streamed,) = final.output
    assert deltas == streamed.arguments == call.arguments and streamed.parsed_arguments == json.loads(deltas)


def test_function_call_output_round_trip(oai):
    """The agent loop: call, run the tool, send its output with previous_response_id; the prompt is the same as
    sending the whole conversation."""
    first = oai.responses.create(input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=100, **GREEDY)
    (call,) = [item for item in first.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}
    follow = oai.responses.create(previous_response_id=first.id, input=[result], tools=[WEATHER],
                                  max_output_tokens=8, **GREEDY)
    assert follow.previous_response_id == first.id and follow.status in ("completed", "incomplete")
    whole = oai.responses.create(input=[{"role": "user", "content": "Weather in Oslo?"},
                                        {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                         "arguments": call.arguments}, result],
                                 tools=[WEATHER], max_output_tokens=8, **GREEDY)
    assert follow.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    assert [i.model_dump(exclude={"id", "call_id"}) for i in follow.output] == \
           [i.model_dump(exclude={"id", "call_id"}) for i in whole.output]


def test_retrieve_and_delete(oai):
    r = oai.responses.create(input="hi", max_output_tokens=3, **GREEDY)
    got = oai.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as exc:
        oai.responses.retrieve(r.id)
    assert exc.value.body["code"] == "response_not_found"


def test_errors_reach_the_client(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.responses.create(input="hi", tools=[{"type": "web_search"}], **GREEDY)
    assert exc.value.body["param"] == "tools.0"
    with pytest.raises(openai.NotFoundError) as exc:
        oai.responses.create(input="hi", previous_response_id="resp_nope", **GREEDY)
    assert exc.value.body["param"] == "previous_response_id"
