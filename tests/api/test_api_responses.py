"""POST /v1/responses over raw HTTP on the dummy model: the response object's shape, statuses, the streamed event
sequence, errors in OpenAI's shape naming the Responses field, the store (size and age eviction, store off), and
previous_response_id continuing a conversation. The official client's view is in test_api_responses_openai.py."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from server.api.answer import AnswerParser
from server.api.protocol.responses import ResponsesRequest
from server.api.responses.convert import to_chat_request
from server.api.responses.events import Turn
from server.api.responses.store import ResponseStore, StoredResponse
from server.api.routes.chat import render_messages
from server.api.routes.responses import response_events
from server.api.tools import plan_tools
from server.engine import RequestOutput, RequestTimeoutError
from tests.api.test_api_errors import error_of
from tests.support.scripted import ScriptedEngine
from tests.support.servers import make_app, wait_ready

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)  # the `openai` package's own types: strict on required fields
SHORT = {"input": "hi", "max_output_tokens": 6, "temperature": 0}
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}


def events_of(r) -> list[dict]:
    """The events of a Responses SSE body; each `event:` line names its data's type, and each event validates
    against the `openai` package's type for it."""
    events, name = [], None
    for line in r.text.splitlines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            event = json.loads(line[len("data: "):])
            assert event["type"] == name, (name, event)
            STREAM_EVENT.validate_python(event)
            events.append(event)
    return events


def test_text_response_shape(client):
    r = client.post("/v1/responses", json={**SHORT, "instructions": "be brief", "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    body = r.json()
    Response.model_validate(body)
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == "dummy:tiny"
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["instructions"] == "be brief" and body["metadata"] == {"k": "v"} and body["tool_choice"] == "auto"
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "incomplete"
    assert item["id"].startswith("msg_") and [p["type"] for p in item["content"]] == ["output_text"]
    usage = body["usage"]
    assert usage["output_tokens"] == 6 and usage["total_tokens"] == usage["input_tokens"] + 6
    assert set(usage) == {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
                          "total_tokens"}


def test_stream_event_sequence_matches_the_whole_response(client):
    whole = client.post("/v1/responses", json=SHORT).json()
    r = client.post("/v1/responses", json={**SHORT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    final = events[-1]["response"]
    text = whole["output"][0]["content"][0]["text"]
    assert "".join(deltas) == events[-4]["text"] == final["output"][0]["content"][0]["text"] == text
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert final["id"] == events[0]["response"]["id"]
    assert [final["usage"][k] for k in ("input_tokens", "output_tokens")] == [whole["usage"]["input_tokens"], 6]
    assert events[-2]["item"] == final["output"][0]


def test_forced_call_streams_argument_deltas(client):
    body = {"input": "weather in Oslo?", "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                             "name": "get_weather"},
            "max_output_tokens": 100, "temperature": 0}
    whole = client.post("/v1/responses", json=body).json()
    assert whole["status"] == "completed", whole
    Response.model_validate(whole)
    (call,) = whole["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    assert set(json.loads(call["arguments"])) == {"city"}
    events = events_of(client.post("/v1/responses", json={**body, "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[2] == "response.output_item.added" and events[2]["item"]["arguments"] == ""
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == events[-3]["arguments"] == call["arguments"]


def test_tool_round_trip_renders_call_and_output(dummy_engine):
    """A function_call and its function_call_output reach the prompt in the tools format the template reads."""
    body = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}],
        "instructions": "answer from tool results", "tools": [WEATHER]})
    chat = to_chat_request(body, body.input)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    tokenizer = dummy_engine.tokenizer
    plan = plan_tools(chat, getattr(tokenizer.hf, "chat_template", None))
    prompt = tokenizer.decode(render_messages(chat.messages, tokenizer, True, plan), skip_special_tokens=False)
    assert "answer from tool results" in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


def test_instructions_join_a_leading_system_message():
    body = ResponsesRequest.model_validate({"instructions": "be brief", "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "in French"}]},
        {"role": "user", "content": "hi"}]})
    chat = to_chat_request(body, body.input)
    assert [(m.role, m.content) for m in chat.messages] == [("developer", "be brief\n\nin French"), ("user", "hi")]


@pytest.mark.parametrize("extra, status, param, needle", [
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0", "'web_search'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ({"tools": [{**WEATHER, "parameters": {"type": "string"}}]}, 400, "tools.0.parameters", "type object"),
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}],
      "tool_choice": "required"}, 400, "tools.0.parameters", "schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format", "needs a schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, 400,
     "text.format.schema", "invalid JSON schema"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [WEATHER], "tool_choice": "required"}, 400,
     "tool_choice", "text.format"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input.0", "input items must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input.0.message.content", "'input_image'"),
    ({"input": []}, 400, "input", "no message"),
    ({"input": "x" * 40_000}, 400, "input", "context length"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens", "greater than"),
    ({"temperature": -1}, 400, "temperature", "temperature"),
    ({"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata", "16 pairs"),
    ({"model": "gpt-5"}, 404, "model", "does not exist"),
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id", "resp_unknown"),
])
def test_errors_name_the_responses_field(client, extra, status, param, needle):
    err = error_of(client.post("/v1/responses", json={**SHORT, **extra}), status)
    assert err["param"] == param and needle in err["message"], err


def test_retrieve_delete_and_store_false(client):
    created = client.post("/v1/responses", json=SHORT).json()
    assert client.get(f"/v1/responses/{created['id']}").json() == created
    r = client.delete(f"/v1/responses/{created['id']}")
    assert r.status_code == 200 and r.json() == {"id": created["id"], "object": "response", "deleted": True}
    for r in (client.get(f"/v1/responses/{created['id']}"), client.delete(f"/v1/responses/{created['id']}")):
        assert error_of(r, 404)["code"] == "response_not_found"
    unstored = client.post("/v1/responses", json={**SHORT, "store": False}).json()
    assert unstored["store"] is False
    assert error_of(client.get(f"/v1/responses/{unstored['id']}"), 404)["code"] == "response_not_found"


def test_previous_response_id_prepends_the_stored_turns(client):
    """A continuation's prompt is the earlier input and output then the new input: exactly the prompt of sending
    the whole conversation at once; the earlier instructions are not carried over."""
    first = client.post("/v1/responses", json={**SHORT, "instructions": "only for the first turn"}).json()
    answer = first["output"][0]["content"][0]["text"]
    follow = client.post("/v1/responses", json={**SHORT, "input": "and then?",
                                                "previous_response_id": first["id"]}).json()
    assert follow["previous_response_id"] == first["id"] and follow["instructions"] is None
    whole = client.post("/v1/responses", json={**SHORT, "input": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "and then?"}]}).json()
    assert follow["usage"]["input_tokens"] == whole["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    assert follow["output"][0]["content"] == whole["output"][0]["content"]
    chained = client.post("/v1/responses", json={**SHORT, "input": "more", "previous_response_id": follow["id"]})
    assert chained.json()["usage"]["input_tokens"] > follow["usage"]["input_tokens"]


def entry(name: str) -> StoredResponse:
    return StoredResponse({"id": name}, [])


def test_store_evicts_least_recently_used_and_expired():
    now = [0.0]
    store = ResponseStore(2, 10.0, clock=lambda: now[0])
    store.put("a", entry("a"))
    now[0] = 1
    store.put("b", entry("b"))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", entry("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    now[0] = 10.5  # a (stored at 0) has expired, c (stored at 1) has not
    assert store.get("a") is None and store.get("c") is not None and len(store) == 1
    assert store.delete("c") and not store.delete("c") and len(store) == 0
    off = ResponseStore(0, 10.0)
    off.put("a", entry("a"))
    assert not off.enabled and off.get("a") is None


def test_store_limits_over_http(dummy_engine):
    with TestClient(make_app(dummy_engine, responses_store_max_entries=2)) as c:
        wait_ready(c.get)
        ids = [c.post("/v1/responses", json=SHORT).json()["id"] for _ in range(3)]
        assert [c.get(f"/v1/responses/{i}").status_code for i in ids] == [404, 200, 200]
        now = [0.0]
        c.app.state.response_store = ResponseStore(2, 5.0, clock=lambda: now[0])
        kept = c.post("/v1/responses", json=SHORT).json()["id"]
        assert c.get(f"/v1/responses/{kept}").status_code == 200
        now[0] = 6
        assert error_of(c.get(f"/v1/responses/{kept}"), 404)["code"] == "response_not_found"
        assert error_of(c.post("/v1/responses", json={**SHORT, "previous_response_id": kept}),
                        404)["code"] == "previous_response_not_found"


def test_store_off(dummy_engine):
    with TestClient(make_app(dummy_engine, responses_store_max_entries=0)) as c:
        wait_ready(c.get)
        created = c.post("/v1/responses", json=SHORT)
        assert created.status_code == 200 and created.json()["store"] is True
        err = error_of(c.get(f"/v1/responses/{created.json()['id']}"), 404)
        assert "not stored on this server" in err["message"]
        err = error_of(c.post("/v1/responses", json={**SHORT, "previous_response_id": created.json()["id"]}), 400)
        assert err["param"] == "previous_response_id" and "--responses-store-max-entries" in err["message"]


def test_failure_mid_stream_is_an_error_event_then_response_failed():
    async def stream():
        yield RequestOutput("r", 0, [5], "Hel", num_prompt_tokens=3, num_output_tokens=1)
        raise RequestTimeoutError("the request's timeout passed")

    async def run() -> list[dict]:
        turn = Turn(ResponsesRequest.model_validate(SHORT), "m")
        stored = []
        events = response_events(turn, stream(), AnswerParser.of(None, None), lambda *a: stored.append(a), 1)
        return [e async for e in events], stored

    events, stored = asyncio.run(run())
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "error", "response.failed"]
    assert events[-2]["code"] == "request_timeout" and "timeout" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error" and stored == []
    for event in events:
        STREAM_EVENT.validate_python(event)


@pytest.fixture(scope="module")
def scripted(dummy_engine):
    """Exact answers (which a random model never writes) through a server with a reasoning parser on."""
    engine = ScriptedEngine(dummy_engine)
    with TestClient(make_app(engine, reasoning_parser="qwen3")) as c:
        wait_ready(c.get)
        yield c, engine


def without_ids(output: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in output]


def test_reasoning_item_then_message(scripted):
    client, engine = scripted
    engine.pieces = ["<thi", "nk>\nPlan", ": add.", "\n</", "think>\n\n", "4", "2"]
    whole = client.post("/v1/responses", json={"input": "2 + 40?"}).json()
    Response.model_validate(whole)
    assert whole["status"] == "completed" and without_ids(whole["output"]) == [
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Plan: add."}],
         "status": "completed"},
        {"type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "42", "annotations": [], "logprobs": []}]}]
    assert whole["output"][0]["id"].startswith("rs_")
    events = events_of(client.post("/v1/responses", json={"input": "2 + 40?", "stream": True}))
    kinds = [k for i, k in enumerate(e["type"] for e in events) if i == 0 or k != events[i - 1]["type"]]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    assert kinds == ["response.created", "response.in_progress", *item, "response.reasoning_text.delta",
                     "response.reasoning_text.done", *done, *item, "response.output_text.delta",
                     "response.output_text.done", *done, "response.completed"]
    assert without_ids(events[-1]["response"]["output"]) == without_ids(whole["output"])
    reasoning = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(reasoning) == "Plan: add." and {e["output_index"] for e in events if "reasoning" in e["type"]} == {0}
    assert {e["output_index"] for e in events if "output_text" in e["type"]} == {1}


def test_content_then_parallel_calls_after_reasoning(scripted):
    client, engine = scripted
    call = '<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{}"}}}}\n</tool_call>'
    engine.pieces = ["<think>look it up</think>", "Let me check.\n", call.format("Oslo"), "\n", call.format("Rome")]
    body = {"input": "weather in Oslo and Rome?", "tools": [WEATHER]}
    whole = client.post("/v1/responses", json=body).json()
    Response.model_validate(whole)
    assert [i["type"] for i in whole["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert whole["output"][1]["content"][0]["text"] == "Let me check."
    assert [json.loads(i["arguments"]) for i in whole["output"][2:]] == [{"city": "Oslo"}, {"city": "Rome"}]
    events = events_of(client.post("/v1/responses", json={**body, "stream": True}))
    assert without_ids(events[-1]["response"]["output"]) == without_ids(whole["output"])
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message"), (2, "function_call"), (3, "function_call")]
    single = client.post("/v1/responses", json={**body, "parallel_tool_calls": False}).json()
    assert [i["type"] for i in single["output"]] == ["reasoning", "message", "function_call"]
