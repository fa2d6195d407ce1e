"""Hostile inputs for the agents' routes, in the style of test_api_hostile.py (whose helpers it shares): Anthropic's
Messages (`/v1/messages`, `/v1/messages/count_tokens`), OpenAI's Responses (`/v1/responses`, GET and DELETE
`/v1/responses/{id}`) and the LoRA adapter routes, on a real server (uvicorn on a socket, a dummy model of its own
with LoRA enabled) while real requests run beside them. Each class of input has one exact answer, in the error
shape of the route's own API:
- a body that is not a JSON object: 400 `invalid_request_error` naming no field;
- a valid body with one field of the wrong type, or one number (or length) out of its range: 400 naming that field:
  OpenAI's `param`, or for Anthropic (whose errors carry no `param`) the message's first word, as in Anthropic's own
  `field: reason` messages;
- a valid body naming a model the server does not serve: 404 (`not_found_error`; OpenAI's `model_not_found` on
  `param: "model"`);
- random in-range parameters: 200, streamed to the API's last event when asked;
- random bodies of the right shape, many fields at once: an answer those fields explain;
- junk ids for GET and DELETE /v1/responses/{id}: 404 `response_not_found`;
- adapter paths that name no usable adapter (missing, a file, `~user` of no user, names the OS refuses, broken
  configs or weights, weights that are not finite): 400 naming `lora_path`, nothing loaded; unloading a name not
  loaded: 404.
Across all of them: never a 5xx, never a hang; the real requests finish normally with all their tokens, and every KV
block is back at the end."""
from __future__ import annotations

import json
import math
import re
import urllib.parse

import httpx
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from server.api.protocol import PRIORITY_MAX, PRIORITY_MIN
from server.model import ModelSettings, load_model
from tests.api.test_api_hostile import (
    HYPOTHESIS,
    MODEL,
    UNENFORCEABLE,
    WRONG,
    Answer,
    above,
    anything,
    below,
    expect_400,
    floats,
    ints,
    ints_outside,
    is_json_object,
    post,
    raw_bodies,
    send,
    texts,
)
from tests.support.hostile import hostile_client, real_traffic  # noqa: F401  (fixtures pytest finds here)
from tests.support.servers import ThreadServer, make_app, make_engine, wait_until

MESSAGES, COUNT, RESPONSES = "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
ANTHROPIC = [MESSAGES, COUNT]
ROUTES = [MESSAGES, COUNT, RESPONSES, LOAD, UNLOAD]
HI = [{"role": "user", "content": "Hi"}]
VALID = {  # a small valid body per route (the LoRA ones are of the right shape: no such adapter exists)
    MESSAGES: {"model": MODEL, "messages": HI, "max_tokens": 2},
    COUNT: {"model": MODEL, "messages": HI},
    RESPONSES: {"input": "Hi", "max_output_tokens": 2},
    LOAD: {"lora_name": "hostile", "lora_path": "/nonexistent/adapter"},
    UNLOAD: {"lora_name": "hostile"},
}
REQUIRED = {MESSAGES: {"model", "messages", "max_tokens"}, COUNT: {"model", "messages"}, RESPONSES: {"input"}}

# -- values of the wrong type, by the type a field expects --------------------------------------------------------
AGENT_WRONG = {
    **WRONG,
    "strs": st.sampled_from(["x", 5, True, [5], [None], [["a"]], {"a": "b"}]),
    "a_messages": st.sampled_from([
        "hi", 5, [5], ["hi"], [{"content": "x"}], [{"role": "system", "content": "x"}],
        {"role": "user", "content": "x"}, [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "video"}]}], [{"role": "user", "content": [{"type": "tool_result"}]}],
        [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}]]),
    "a_system": st.sampled_from([5, True, [5], ["x"], [{"type": "text"}], [{"type": "image", "text": "x"}],
                                 {"type": "text", "text": "x"}]),
    "a_tools": st.sampled_from(["x", 5, [5], [{"description": "no name"}], [{"name": "bad name!"}], {"name": "f"},
                                [{"name": "f", "input_schema": "x"}],
                                [{"name": "f", "input_schema": {"type": "string"}}]]),
    "a_tool_choice": st.sampled_from(["auto", 5, [], {"type": "bogus"}, {"type": "tool"}, {"type": "tool", "name": 5},
                                      {"type": "auto", "disable_parallel_tool_use": "yes"}]),
    "a_thinking": st.sampled_from(["on", 5, [], {}, {"type": "maybe"}, {"type": "enabled", "budget_tokens": "many"}]),
    "a_output": st.sampled_from(["x", 5, {"format": "json"}, {"format": {"type": "text"}}, {"effort": 5},
                                 {"format": {"type": "json_schema"}},
                                 {"format": {"type": "json_schema", "schema": "x"}}]),
    "a_metadata": st.sampled_from(["x", 5, [1], {"user_id": 5}, {"user_id": ["a"]}]),
    "r_input": st.sampled_from([
        5, 1.5, True, None, {"a": 1}, [5], [{"type": "item_reference", "id": "x"}],
        [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
        [{"type": "function_call", "name": "f"}], [{"type": "function_call_output", "call_id": "c", "output": 5}]]),
    "r_tools": st.sampled_from(["x", 5, [5], [{"type": "web_search"}], [{"type": "function"}],
                                [{"type": "function", "name": "bad name!"}], {"type": "function", "name": "f"},
                                [{"type": "function", "name": "f", "parameters": {"type": "string"}}]]),
    "r_tool_choice": st.sampled_from(["always", 5, [], {"type": "function"}, {"type": "bogus", "name": "f"},
                                      {"name": "f"}]),
    "r_text": st.sampled_from(["x", 5, [], {"format": "json"}, {"format": {"type": "yaml"}},
                               {"format": {"type": "json_schema"}},
                               {"format": {"type": "json_schema", "schema": "x"}}]),
}
PROMPT_TYPES = {"model": "str", "messages": "a_messages", "system": "a_system", "tools": "a_tools",
                "tool_choice": "a_tool_choice", "thinking": "a_thinking", "output_config": "a_output"}
TYPES = {  # each route's fields and the type each expects
    MESSAGES: {**PROMPT_TYPES, "max_tokens": "int", "stop_sequences": "strs", "stream": "bool", "temperature": "float",
               "top_p": "float", "top_k": "int", "metadata": "a_metadata", "priority": "int", "timeout": "float"},
    COUNT: PROMPT_TYPES,
    RESPONSES: {"model": "str", "input": "r_input", "instructions": "str", "previous_response_id": "str",
                "store": "bool", "tools": "r_tools", "tool_choice": "r_tool_choice", "parallel_tool_calls": "bool",
                "text": "r_text", "max_output_tokens": "int", "temperature": "float", "top_p": "float",
                "top_k": "int", "seed": "int", "metadata": "str_map", "user": "str", "stream": "bool",
                "priority": "int", "timeout": "float"},
    LOAD: {"lora_name": "str", "lora_path": "str"},
    UNLOAD: {"lora_name": "str", "lora_int_id": "int"},
}

# -- numbers (and lengths) out of their range, per field ------------------------------------------------------------
SAMPLING_RANGES = {
    "temperature": st.one_of(below(0.0), above(2.0)), "top_p": st.one_of(below(0.0, inclusive=True), above(1.0)),
    "top_k": ints_outside(-1, 2 ** 31 - 1), "priority": ints_outside(PRIORITY_MIN, PRIORITY_MAX),
    "timeout": below(0.0, inclusive=True),
}
NAMES = st.sampled_from(["", "n" * 257])
# lengths count too; a max_tokens the context window (512) cannot hold is refused naming it
RANGES = {
    MESSAGES: {**SAMPLING_RANGES, "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=512)),
               "messages": st.just([]), "stop_sequences": st.sampled_from([[""], ["s"] * 17])},
    COUNT: {"messages": st.just([])},
    RESPONSES: {**SAMPLING_RANGES, "max_output_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=512)),
                "seed": ints_outside(0, 2 ** 63 - 1),
                "input": st.just([]),
                "metadata": st.sampled_from([{str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}])},
    LOAD: {"lora_name": NAMES, "lora_path": st.just("")},
    UNLOAD: {"lora_name": NAMES},
}

# -- random bodies of the right shape, many fields at once --------------------------------------------------------
block = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                  st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": texts, "content": texts}),
                  st.fixed_dictionaries({"type": st.just("tool_use"), "id": texts, "name": st.just("f"),
                                         "input": st.dictionaries(st.text(max_size=4), texts, max_size=2)}),
                  anything)
a_messages = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                                                       "content": st.one_of(texts, st.lists(block, max_size=2),
                                                                            anything)}), max_size=3), anything)
TOOL = {"name": "f", "description": "a tool",
        "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}
model = st.one_of(st.just(MODEL), texts, anything)
A_FIELDS = {
    "model": model, "messages": a_messages, "max_tokens": ints, "system": st.one_of(texts, anything),
    "temperature": floats, "top_p": floats, "top_k": ints, "priority": ints, "timeout": floats,
    "stop_sequences": st.one_of(st.lists(texts, max_size=3), anything), "stream": st.one_of(st.booleans(), anything),
    "tools": st.one_of(st.just([TOOL]), anything),
    "tool_choice": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"])},
                                                   optional={"name": st.sampled_from(["f", "g"])}), anything),
    "thinking": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "adaptive"])}),
                          anything),
}
r_item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "x"]),
                           "content": st.one_of(texts, anything)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": texts, "output": texts}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": texts, "name": st.just("f"),
                           "arguments": texts}),
    st.just({"type": "reasoning"}), anything)
R_FIELDS = {
    "model": model, "input": st.one_of(texts, st.lists(r_item, max_size=3), anything),
    "instructions": st.one_of(texts, anything), "previous_response_id": st.one_of(texts, anything),
    "store": st.one_of(st.booleans(), anything), "max_output_tokens": ints, "temperature": floats, "top_p": floats,
    "top_k": ints, "seed": ints, "priority": ints, "timeout": floats, "stream": st.one_of(st.booleans(), anything),
    "metadata": st.one_of(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), anything),
    "tools": st.one_of(st.just([{"type": "function", "name": "f", "parameters": TOOL["input_schema"]}]), anything),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), anything),
    "text": st.one_of(st.just({"format": {"type": "text"}}), anything),
}
RIGHT_SHAPE = {MESSAGES: st.fixed_dictionaries({}, optional=A_FIELDS),
               COUNT: st.fixed_dictionaries({}, optional={k: A_FIELDS[k] for k in ("model", "messages", "system",
                                                                                   "tools", "tool_choice")}),
               RESPONSES: st.fixed_dictionaries({}, optional=R_FIELDS)}


# -- the server, and real traffic beside the hostile one ------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_server():
    """A dummy model of its own: serving LoRA wraps the model's projections in place."""
    lm = load_model(ModelSettings(model=MODEL), progress=False)
    engine = make_engine(lm, max_model_len=512, num_kv_blocks=256, max_num_seqs=16, enable_lora=True, max_loras=1,
                         max_lora_rank=8)
    with ThreadServer(make_app(engine)) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()


# -- reading Anthropic's answers ----------------------------------------------------------------------------------
def anthropic_error(answer: Answer, status: int, kind: str) -> str:
    """The message of an Anthropic error, after checking its status, exact shape and type."""
    assert answer.status == status and not answer.stream, (answer.status, answer.text[:500])
    assert set(answer.body) == {"type", "error"} and answer.body["type"] == "error", answer.body
    err = answer.body["error"]
    assert set(err) == {"type", "message"} and err["type"] == kind and isinstance(err["message"], str), err
    return err["message"]


def first_word(message: str) -> str:
    """The field an Anthropic message names: its first word (`max_tokens: ...`, `messages.0.content: ...`)."""
    return re.match(r"[a-z_]*", message).group(0)


def anthropic_events(answer: Answer) -> list[dict]:
    """A Messages stream's events; each carries its type in the `event:` line and in its data."""
    names = [line[7:] for line in answer.text.splitlines() if line.startswith("event: ")]
    events = [json.loads(e) for e in answer.events]
    assert names == [e["type"] for e in events] and events, answer.text[-500:]
    return events


def responses_events(answer: Answer) -> list[dict]:
    events = [json.loads(e) for e in answer.events]
    assert [e["sequence_number"] for e in events] == list(range(len(events))), answer.text[-500:]
    return events


def expect_rejected(path: str, answer: Answer, field: str | None, code: str | None = None) -> None:
    """A 400 naming `field` (or a path inside it), or no field, in the route's own shape (OpenAI's with `code`)."""
    if path in ANTHROPIC:
        message = anthropic_error(answer, 400, "invalid_request_error")
        assert first_word(message) == (field or "") or field is None and first_word(message) not in TYPES[path], \
            (field, message)
    else:
        assert expect_400(answer, field)["code"] == code


# -- the classes of input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ROUTES)
@settings(HYPOTHESIS, max_examples=8)
@given(content=st.one_of(raw_bodies, anything.filter(lambda v: not isinstance(v, dict)).map(
    lambda v: json.dumps(v, allow_nan=True).encode())))
def test_a_body_that_is_no_json_object_is_400_naming_no_field(client, traffic, path, content):
    assume(not is_json_object(content))
    expect_rejected(path, send(client, path, content), None)


@pytest.mark.parametrize("path", ROUTES)
@settings(HYPOTHESIS, max_examples=30)
@given(data=st.data())
def test_a_field_of_the_wrong_type_is_400_naming_it(client, traffic, path, data):
    field = data.draw(st.sampled_from(sorted(TYPES[path])), label="field")
    value = data.draw(AGENT_WRONG[TYPES[path][field]], label="value")
    expect_rejected(path, post(client, path, {**VALID[path], field: value}), field)


@pytest.mark.parametrize("path", ROUTES)
@settings(HYPOTHESIS, max_examples=25)
@given(data=st.data())
def test_a_number_or_length_out_of_range_is_400_naming_it(client, traffic, path, data):
    field = data.draw(st.sampled_from(sorted(RANGES[path])), label="field")
    value = data.draw(RANGES[path][field], label="value")
    too_long = field == "max_output_tokens" and value >= 512  # more than the context window holds
    expect_rejected(path, post(client, path, {**VALID[path], field: value}), field,
                    "context_length_exceeded" if too_long else None)


@pytest.mark.parametrize("path", [MESSAGES, COUNT, RESPONSES])
@settings(HYPOTHESIS, max_examples=6)
@given(name=st.one_of(st.text(max_size=20), st.sampled_from(["", "claude-sonnet-4-5", MODEL.upper(), MODEL + " "])))
def test_an_unknown_model_is_404(client, traffic, path, name):
    assume(name != MODEL)
    answer = post(client, path, {**VALID[path], "model": name})
    if path in ANTHROPIC:
        message = anthropic_error(answer, 404, "not_found_error")
        assert message.startswith("model: ") and repr(name) in message, message
    else:
        assert answer.status == 404, (answer.status, answer.text[:500])
        err = answer.error
        assert (err["type"], err["code"], err["param"]) == ("not_found_error", "model_not_found", "model"), err


plain_text = st.text(alphabet=st.characters(categories=["L", "N", "P", "Zs"]), min_size=1, max_size=40)
in_range = {  # sampling fields both generating APIs take, in range
    "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.01, 1.0), "top_k": st.integers(-1, 2 ** 31 - 1),
    "priority": st.integers(PRIORITY_MIN, PRIORITY_MAX), "timeout": st.floats(60, 1e6), "stream": st.booleans(),
}


@settings(HYPOTHESIS, max_examples=15)
@given(body=st.fixed_dictionaries({"max_tokens": st.integers(1, 3)}, optional={
    **in_range, "system": plain_text, "stop_sequences": st.lists(plain_text, max_size=3),
    "metadata": st.fixed_dictionaries({"user_id": plain_text}),
    "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}])}),
    text=plain_text)
def test_in_range_messages_are_answered(client, traffic, body, text):
    answer = post(client, MESSAGES, {"model": MODEL, "messages": [{"role": "user", "content": text}], **body})
    assert answer.status == 200, (answer.status, answer.text[:500])
    if answer.stream:
        events = anthropic_events(answer)
        assert (events[0]["type"], events[-1]["type"]) == ("message_start", "message_stop"), events
        (stop,) = [e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta"]
    else:
        assert answer.body["type"] == "message" and answer.body["usage"]["output_tokens"] <= body["max_tokens"]
        stop = answer.body["stop_reason"]
    assert stop in {"end_turn", "max_tokens", "stop_sequence"}, answer.text[-500:]
    count = post(client, COUNT, {"model": MODEL, "messages": [{"role": "user", "content": text}],
                                 **{k: body[k] for k in ("system", "thinking") if k in body}})
    assert count.status == 200 and count.body["input_tokens"] > 0, count.text[:500]


@settings(HYPOTHESIS, max_examples=15)
@given(body=st.fixed_dictionaries({"max_output_tokens": st.integers(1, 3)}, optional={
    **in_range, "seed": st.integers(0, 2 ** 63 - 1), "instructions": plain_text, "store": st.booleans(),
    "user": plain_text, "metadata": st.dictionaries(plain_text, plain_text, max_size=3),
    "text": st.just({"format": {"type": "text"}})}), text=plain_text)
def test_in_range_responses_are_answered(client, traffic, body, text):
    answer = post(client, RESPONSES, {"input": text, **body})
    assert answer.status == 200, (answer.status, answer.text[:500])
    if answer.stream:
        events = responses_events(answer)
        assert events[0]["type"] == "response.created" and "error" not in {e["type"] for e in events}, events
        response = events[-1]["response"]
        assert events[-1]["type"] == f"response.{response['status']}", events[-1]
    else:
        response = answer.body
    assert response["object"] == "response" and response["status"] in {"completed", "incomplete"}, response
    assert response["usage"]["output_tokens"] <= body["max_output_tokens"], response


def explained_anthropic(path: str, body: dict, answer: Answer) -> None:
    if answer.status == 200:
        if answer.stream:  # only a tiny timeout may end a stream that started with an error
            last = anthropic_events(answer)[-1]
            assert last["type"] == "message_stop" or (last["error"]["type"], "timeout" in body) == (
                "timeout_error", True), last
        return
    if answer.status == 404:
        assert "model" in body and body["model"] != MODEL, answer.text
        assert anthropic_error(answer, 404, "not_found_error").startswith("model: ")
    elif answer.status == 504:
        anthropic_error(answer, 504, "timeout_error")
        assert "timeout" in body
    else:
        message = anthropic_error(answer, 400, "invalid_request_error")
        assert first_word(message) in set(body) | REQUIRED[path], (message, sorted(body))


def explained_openai(body: dict, answer: Answer) -> None:
    if answer.status == 200:
        if answer.stream:  # only a tiny timeout may fail a stream that started
            events = responses_events(answer)
            errors = [e for e in events if e["type"] == "error"]
            assert all(e["code"] == "request_timeout" for e in errors) and (not errors or "timeout" in body), errors
        return
    err = answer.error
    if answer.status == 404:
        assert (err["param"], err["code"]) in {("model", "model_not_found"),
                                               ("previous_response_id", "previous_response_not_found")}, err
        assert body.get(err["param"]) != MODEL, err
    elif answer.status == 504:
        assert err["code"] == "request_timeout" and "timeout" in body, err
    else:
        assert answer.status == 400 and err["type"] == "invalid_request_error", (answer.status, err)
        assert err["param"].split(".")[0] in set(body) | REQUIRED[RESPONSES], (err, sorted(body))


@pytest.mark.parametrize("path", [MESSAGES, COUNT, RESPONSES])
@settings(HYPOTHESIS, max_examples=60)
@given(data=st.data())
def test_random_bodies_get_an_answer_their_fields_explain(client, traffic, path, data):
    body = data.draw(RIGHT_SHAPE[path], label="body")
    answer = post(client, path, body)
    if path in ANTHROPIC:
        explained_anthropic(path, body, answer)
    else:
        explained_openai(body, answer)


SCHEMAS = [fields["response_format"]["json_schema"]["schema"] for fields, _ in UNENFORCEABLE
           if "response_format" in fields]
SCHEMA_FIELDS = {  # where each route takes a JSON Schema for its answer, and the field its 400 names
    MESSAGES: (lambda schema: {"output_config": {"format": {"type": "json_schema", "schema": schema}}},
               "output_config.format.schema"),
    RESPONSES: (lambda schema: {"text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}},
                "text.format.schema"),
}


@pytest.mark.parametrize("path", sorted(SCHEMA_FIELDS))
@settings(HYPOTHESIS, max_examples=4)
@given(schema=st.sampled_from(SCHEMAS))
def test_schemas_that_cannot_be_enforced_are_400_naming_them(client, traffic, path, schema):
    """Named under each API's own field (the chat pipeline underneath calls it response_format)."""
    fields, param = SCHEMA_FIELDS[path]
    answer = post(client, path, {**VALID[path], **fields(schema)})
    if path in ANTHROPIC:
        assert anthropic_error(answer, 400, "invalid_request_error").startswith(param + ": "), answer.text
    else:
        assert expect_400(answer, param)["param"] == param, answer.text


@settings(HYPOTHESIS, max_examples=15)
@given(response_id=st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and s.strip(".")),
       method=st.sampled_from(["GET", "DELETE"]))
def test_junk_response_ids_are_404(client, traffic, response_id, method):
    r = client.request(method, "/v1/responses/" + urllib.parse.quote(response_id, safe=""))
    answer = Answer(r, r.text)
    assert answer.status == 404, (answer.status, answer.text[:500])
    err = answer.error
    assert (err["type"], err["code"], err["param"]) == ("not_found_error", "response_not_found", "response_id"), err


def test_a_stored_response_is_found_until_deleted(client, traffic):
    """The junk ids above are 404 for being junk: a real id is found, then deleted, then 404."""
    created = post(client, RESPONSES, VALID[RESPONSES]).body["id"]
    assert client.get(f"/v1/responses/{created}").json()["id"] == created
    assert client.delete(f"/v1/responses/{created}").json() == {"id": created, "object": "response", "deleted": True}
    assert client.get(f"/v1/responses/{created}").json()["error"]["code"] == "response_not_found"


# -- LoRA adapters that cannot be loaded ---------------------------------------------------------------------------
def lora_pair(module, rank: int = 4, fill: float = 0.01) -> dict[str, torch.Tensor]:
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_{}.weight"
    return {key.format("A"): torch.full((rank, module.in_features), fill),
            key.format("B"): torch.full((module.out_features, rank), fill)}


def adapter(root, name: str, config=None, tensors: dict | None = None, weights: bytes | None = None) -> str:
    directory = root / name
    directory.mkdir()
    if config is not None:
        (directory / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    if weights is not None:
        (directory / "adapter_model.safetensors").write_bytes(weights)
    return str(directory)


@pytest.fixture(scope="module")
def junk_adapters(hostile_server, tmp_path_factory) -> tuple[list[str], str]:
    """Paths that name no adapter this server can serve, and one that does."""
    root = tmp_path_factory.mktemp("junk-adapters")
    o_proj = hostile_server.engine.loras.slots.modules["model.layers.0.self_attn.o_proj"]
    ok, pair = {"r": 4, "lora_alpha": 8}, lora_pair(o_proj)
    (root / "a-file").write_text("not an adapter")
    (root / "config-is-a-dir").mkdir()
    (root / "config-is-a-dir" / "adapter_config.json").mkdir()
    key_a, key_b = list(pair)
    junk = [
        "/nonexistent/adapter", str(root / "a-file"), "~no_such_user_of_loom/adapter", "~\x00", "x\x00y",
        "a" * 5000, "/" + "a" * 300, str(root / "config-is-a-dir"), adapter(root, "no-config"),
        adapter(root, "not-json", "{"), adapter(root, "array", "[]"),
        adapter(root, "prefix", {"peft_type": "PREFIX_TUNING"}), adapter(root, "r-text", {"r": "4"}),
        adapter(root, "r-zero", {"r": 0}), adapter(root, "r-huge", {"r": 10 ** 30}),
        adapter(root, "alpha-text", {"r": 4, "lora_alpha": "8"}), adapter(root, "dora", {**ok, "use_dora": True}),
        adapter(root, "bias", {**ok, "bias": "all"}), adapter(root, "no-weights", ok),
        adapter(root, "garbage", ok, weights=b"\x00" * 64), adapter(root, "bad-key", ok, {"w": torch.zeros(2, 2)}),
        adapter(root, "a-only", ok, {key_a: pair[key_a]}), adapter(root, "rank-8", ok, lora_pair(o_proj, rank=8)),
        adapter(root, "wrong-in", ok, {key_a: torch.zeros(4, 3), key_b: pair[key_b]}),
        adapter(root, "layer-999", ok, {k.replace("layers.0", "layers.999"): v for k, v in pair.items()}),
        adapter(root, "nan-weights", ok, lora_pair(o_proj, fill=math.nan)),
        adapter(root, "inf-weights", ok, lora_pair(o_proj, fill=math.inf)),
        adapter(root, "nan-alpha", '{"r": 4, "lora_alpha": NaN}', pair),
        adapter(root, "overflowing-alpha", {"r": 4, "lora_alpha": 1e300}, pair),
    ]
    return junk, adapter(root, "good", ok, pair)


def served_models(client) -> set[str]:
    return {card["id"] for card in client.get("/v1/models").json()["data"]}


def test_junk_adapter_paths_are_400_and_load_nothing(client, traffic, junk_adapters):
    junk, good = junk_adapters
    for i, path in enumerate(junk):
        err = expect_400(post(client, LOAD, {"lora_name": f"junk-{i}", "lora_path": path}), "lora_path")
        assert err["param"] == "lora_path", (path[:80], err)
    assert served_models(client) == {MODEL}
    # the same route loads a real adapter, which then answers, and unloads it
    assert post(client, LOAD, {"lora_name": "good", "lora_path": good}).status == 200
    answer = post(client, MESSAGES, {**VALID[MESSAGES], "model": "good"})
    assert answer.status == 200 and answer.body["model"] == "good", answer.text[:500]
    assert post(client, UNLOAD, {"lora_name": "good"}).body["status"] == "unloaded"
    assert served_models(client) == {MODEL}


@settings(HYPOTHESIS, max_examples=8)
@given(name=st.text(min_size=1, max_size=30))
def test_unloading_a_name_not_loaded_is_404(client, traffic, name):
    answer = post(client, UNLOAD, {"lora_name": name})
    assert answer.status == 404, (answer.status, answer.text[:500])
    assert (answer.error["code"], answer.error["param"]) == ("model_not_found", "lora_name"), answer.error


def test_real_requests_unharmed_and_every_block_back(hostile_server, traffic):
    """Runs last in this module: the traffic that ran beside the hostile requests finished normally."""
    traffic.stop.set()
    traffic.thread.join(60)
    assert len(traffic.results) >= 4, traffic.results
    assert all(r == (200, "length", 24) for r in traffic.results), traffic.results
    engine = hostile_server.engine
    assert wait_until(lambda: (s := engine.stats()).running == 0 and s.waiting == 0
                      and s.free_blocks == s.num_blocks, timeout=30), engine.stats()
    metrics = httpx.get(hostile_server.url + "/metrics", timeout=10).text
    assert 'status="500"' not in metrics and engine.healthy
