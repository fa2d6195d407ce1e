"""Structured output and tools over HTTP on the dummy model: every refusal is a 400 with `param` (malformed
schemas, keywords the grammar cannot enforce, bad regexes and grammars, tool_choice mistakes); constrained answers
come back in OpenAI's shapes; a schema that is slow to compile is refused after the time limit without delaying
an unconstrained request beside it."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.api.test_api_errors import error_of
from tests.support.servers import make_app, make_engine, wait_ready

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}


def schema_format(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


@pytest.mark.parametrize("extra, param, needle", [
    (schema_format({"type": "nope"}), "response_format.json_schema.schema", "invalid JSON schema"),
    (schema_format({"type": "object", "properties": {"a": {"type": "integer", "minimum": "low"}}}),
     "response_format.json_schema.schema", "invalid JSON schema"),
    (schema_format({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema", "uniqueItems"),
    (schema_format({"type": "string", "x-unknown": 1}), "response_format.json_schema.schema", "x-unknown"),
    (schema_format({"type": "string", "format": "credit-card"}), "response_format.json_schema.schema", "format"),
    (schema_format({"not": {"type": "string"}}), "response_format.json_schema.schema", "'not'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "schema"),
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"grammar": 'root ::= "a" | undefined_rule'}}, "structured_outputs.grammar", "grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "choice"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "either"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "get_time"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "contains": {}}}}}}],
      "tool_choice": "required"}, "tools.0.function.parameters", "contains"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "type object"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"type": "integer"}}}]},
     "tools.1.function.parameters", "type object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"enum": ["a", "b"]}}}],
      "tool_choice": "required"}, "tools.0.function.parameters", "type object"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    # keywords the grammar engine would ignore, and grammars that match nothing: refused, naming what
    (schema_format({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"],
                    "additionalProperties": False}), "response_format.json_schema.schema", "'required' names 'b'"),
    (schema_format({"type": "string", "allOf": [{"maxLength": 3}]}), "response_format.json_schema.schema", "allOf"),
    (schema_format({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 3}),
     "response_format.json_schema.schema", "$ref"),
    (schema_format({"type": "number", "multipleOf": 0.5}), "response_format.json_schema.schema", "multipleOf"),
    ({"structured_outputs": {"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
     "structured_outputs.json", "oneOf"),
    ({"structured_outputs": {"json": {"type": "object", "additionalProperties": {"type": "integer"},
                                      "minProperties": 2}}}, "structured_outputs.json", "minProperties"),
    (schema_format({"type": "string", "pattern": "^(?!abc)[a-c]{3}$"}), "response_format.json_schema.schema",
     "lookahead"),
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs.regex", "matches no text"),
    ({"structured_outputs": {"grammar": "root ::= root"}}, "structured_outputs.grammar", "matches no text"),
    ({"structured_outputs": {"regex": "a^b"}}, "structured_outputs.regex", "cannot be enforced exactly"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "allOf": [{"maxLength": 2}]}}}}}],
      "tool_choice": "required"}, "tools.0.function.parameters", "allOf"),
    # tool results that answer no call
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "22C"}]},
     "messages.1.tool_call_id", "needs tool_call_id"),
    ({"messages": [{"role": "tool", "content": "22C", "tool_call_id": "call_1"}]}, "messages.0.tool_call_id",
     "not an unanswered tool call"),
    ({"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "content": "22C", "tool_call_id": "call_2"}]}, "messages.2.tool_call_id",
     "'call_2'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
])
def test_structured_refusals_are_400_with_param(client, extra, param, needle):
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400)
    assert err["type"] == "invalid_request_error"
    if needle:
        assert err["param"] == param and needle in err["message"], err
    else:  # pydantic's own refusal: it names the field (and the union member it tried)
        assert err["param"].startswith(param), err


def test_completions_refuse_bad_regex_with_param(client):
    err = error_of(client.post("/v1/completions", json={"prompt": "x", "structured_outputs": {"regex": "(ab"}}), 400)
    assert err["param"] == "structured_outputs.regex"


def test_constrained_answers_on_both_routes(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 20, "n": 3, "temperature": 1.0, "seed": 1,
                                             "structured_outputs": {"regex": "[a-c]{5}"}})
    assert r.status_code == 200, r.text
    assert all(re.fullmatch("[a-c]{5}", c["text"]) and c["finish_reason"] == "stop" for c in r.json()["choices"])
    r = client.post("/v1/chat/completions", json={**CHAT, "structured_outputs": {"choice": ["yes", "no"]}})
    (choice,) = r.json()["choices"]
    assert choice["message"]["content"] in ("yes", "no") and choice["finish_reason"] == "stop"


def test_forced_tool_call_shape_streamed_and_not(client):
    body = {**CHAT, "max_tokens": 100, "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                         "function": {"name": "get_weather"}}}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    (call,) = message["message"]["tool_calls"]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None, message
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and set(json.loads(call["function"]["arguments"])) == {"city"}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = next(d for d in deltas if d.get("tool_calls"))["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["function"]["name"] == "get_weather"
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if d.get("tool_calls"))
    assert arguments == call["function"]["arguments"]  # greedy: the same call, streamed in pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def slow_schema(fields: int = 40) -> dict:
    email = {"type": "string", "pattern": "[a-z]{3,40}@[a-z]{2,30}\\.(com|org|net)"}
    return {"type": "object", "properties": {f"f{i}": email for i in range(fields)},
            "required": [f"f{i}" for i in range(fields)]}


def test_slow_schema_is_refused_and_does_not_delay_others(dummy_lm):
    engine = make_engine(dummy_lm, grammar_compile_timeout=0.5)
    try:
        with TestClient(make_app(engine)) as c:
            wait_ready(c.get)
            plain = {"prompt": "hello", "max_tokens": 8, "temperature": 0}

            def timed() -> float:
                started = time.perf_counter()
                assert c.post("/v1/completions", json=plain).status_code == 200
                return time.perf_counter() - started

            baseline = min(timed() for _ in range(3))
            slow: dict = {}

            def send_slow() -> None:
                started = time.perf_counter()
                slow["response"] = c.post("/v1/chat/completions", json={**CHAT, **schema_format(slow_schema())})
                slow["seconds"] = time.perf_counter() - started

            thread = threading.Thread(target=send_slow)
            thread.start()
            time.sleep(0.05)
            beside = [timed() for _ in range(3)]  # while the schema compiles
            thread.join()
            err = error_of(slow["response"], 400)
            assert err["param"] == "response_format.json_schema.schema" and err["code"] == "grammar_compile_timeout"
            assert 0.5 <= slow["seconds"] < 3.0, slow
            assert max(beside) < baseline * 3 + 0.25, (baseline, beside)
    finally:
        engine.shutdown()


def test_integer_bounds_may_be_fractional(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 2.5, "maximum": 4.5}},
              "required": ["n"]}
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1.0, "seed": 3, "n": 4,
                                                  **schema_format(schema)})
    assert r.status_code == 200, r.text
    assert {json.loads(c["message"]["content"])["n"] for c in r.json()["choices"]} <= {3, 4}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_grammar_dead_end_is_a_clean_finish(client, path):
    """`a[^\\s\\S]` allows "a" and then nothing: the answer stops there, with a finish reason that says so."""
    body = {"max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 5, "structured_outputs": {"regex": "a[^\\s\\S]"}}
    body |= {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT["messages"]}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert (c.get("text", c.get("message", {}).get("content")), c["finish_reason"]) == ("a", "grammar_dead_end")


def test_a_forced_call_cut_by_max_tokens_has_no_content(client):
    body = {**CHAT, "max_tokens": 3, "tools": [WEATHER], "tool_choice": "required"}
    (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None, choice
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert set(contents) <= {"", None} and chunks[-1]["choices"][0]["finish_reason"] == "length", chunks


def test_tool_results_answering_calls_are_accepted(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": "22C", "tool_call_id": "call_1"}]
    r = client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
