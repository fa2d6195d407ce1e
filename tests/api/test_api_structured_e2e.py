"""Structured output and tools end to end on the default model (the session's real `loom serve`): ten schemas give
output that parses and validates in every case, greedy and sampled, streamed and not; choices and regexes match
exactly; the official `openai` client's `parse` and a tool round trip work. Marked slow."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.servers import sse_chunks

pytestmark = pytest.mark.slow

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 120}}, "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "address": {"type": "object", "properties": {
            "city": NAME, "zip": {"type": "string", "pattern": "[0-9]{5}"}}, "required": ["city", "zip"]}},
        "required": ["id", "address"]}}, "required": ["user"]},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                                                                                           "maxLength": 8},
                                                               "minItems": 2, "maxItems": 4}}, "required": ["tags"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"]},
    "integer_bounds": {"type": "object", "properties": {"low": {"type": "integer", "minimum": -5, "maximum": 5},
                                                        "high": {"type": "integer", "exclusiveMinimum": 100,
                                                                 "maximum": 200}}, "required": ["low", "high"]},
    "number_bounds": {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1},
                                                       "temp": {"type": "number", "minimum": -40, "maximum": 50}},
                      "required": ["ratio", "temp"]},
    "string_pattern_lengths": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{2,4}"}, "word": {"type": "string", "minLength": 3,
                                                                               "maxLength": 6}},
        "required": ["code", "word"]},
    "optional_fields": {"type": "object", "properties": {"title": NAME, "subtitle": NAME,
                                                         "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
                        "required": ["title"]},
    "anyof_null": {"type": "object", "properties": {"nickname": {"anyOf": [NAME, {"type": "null"}]},
                                                    "score": {"anyOf": [{"type": "integer", "minimum": 0,
                                                                         "maximum": 10}, {"type": "null"}]}},
                   "required": ["nickname", "score"]},
    "array_of_objects": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "[a-z]{2}[0-9]{2}"}, "qty": {"type": "integer", "minimum": 1,
                                                                          "maximum": 9},
        "gift": {"type": "boolean"}}, "required": ["sku", "qty", "gift"]}, "minItems": 1, "maxItems": 3},
}
SAMPLINGS = [{"temperature": 0}] + [{"temperature": 1.0, "seed": s} for s in (1, 2, 3)]


async def chat(client: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    """(content, finish_reason), from a streamed or a whole answer."""
    if not body.get("stream"):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = "", None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for chunk in sse_chunks(r):
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
                finish = c["finish_reason"] or finish
    return text, finish


def test_ten_schemas_always_validate(real_server):
    async def main():
        async with httpx.AsyncClient(base_url=real_server, timeout=300) as client:
            jobs, cases = [], []
            for name, schema in SCHEMAS.items():
                for i, sampling in enumerate(SAMPLINGS):  # each schema both streamed and whole, greedy and sampled
                    stream = i % 2 == 1
                    body = {"messages": [{"role": "system", "content": "Answer in JSON."},
                                         {"role": "user", "content": f"Give me an example {name} record."}],
                            "max_tokens": 160, "stream": stream, **sampling,
                            "response_format": {"type": "json_schema",
                                                "json_schema": {"name": name, "schema": schema, "strict": True}}}
                    jobs.append(chat(client, body))
                    cases.append((name, sampling, stream))
            return cases, await asyncio.gather(*jobs)

    cases, results = asyncio.run(main())
    assert len(results) == 40
    for (name, sampling, stream), (text, finish) in zip(cases, results):
        assert finish == "stop", (name, sampling, stream, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])

    # Streamed == whole for the same greedy request, run one after the other: under the concurrent load above the
    # two copies can meet different step shapes (a prefill chunk beside decodes, or a decode-only step) whose
    # roundings differ, and a near-tie may then flip. Alone, after a first copy has left the prompt's full blocks in
    # the prefix cache (the first would prefill the whole prompt, the later ones only its last block: another row
    # count, another kernel), both take exactly the same steps.
    name = next(iter(SCHEMAS))

    async def sequential():
        async with httpx.AsyncClient(base_url=real_server, timeout=300) as client:
            out = []
            for stream in (False, False, True):
                body = {"messages": [{"role": "user", "content": f"Give me an example {name} record."}],
                        "max_tokens": 160, "stream": stream, "temperature": 0,
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}}
                out.append(await chat(client, body))
            return out

    _, whole, streamed = asyncio.run(sequential())
    assert whole == streamed and whole[1] == "stop"


def test_choice_and_regex_match_exactly(real_server):
    choices = ["positive", "negative", "neutral"]
    with httpx.Client(base_url=real_server, timeout=120) as client:
        for seed in (1, 2):
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Sentiment of: I love it!"}], "temperature": 1.0,
                "seed": seed, "n": 2, "structured_outputs": {"choice": choices}})
            assert all(c["message"]["content"] in choices and c["finish_reason"] == "stop"
                       for c in r.json()["choices"]), r.text
            r = client.post("/v1/completions", json={"prompt": "A phone number:", "temperature": 1.0, "seed": seed,
                                                     "max_tokens": 30, "structured_outputs": {
                                                         "regex": r"\(\d{3}\) \d{3}-\d{4}"}})
            (c,) = r.json()["choices"]
            assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c["text"]) and c["finish_reason"] == "stop", r.text


@pytest.fixture(scope="module")
def oai(real_server):
    return openai.OpenAI(base_url=real_server + "/v1", api_key="none", max_retries=0, timeout=120)


class City(BaseModel):
    name: str = Field(max_length=24)  # unbounded strings let a greedy small model repeat itself to max_tokens
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=10 ** 9)


def test_openai_parse_returns_a_pydantic_object(oai):
    r = oai.chat.completions.parse(model="default", response_format=City, max_tokens=120, temperature=0,
                                   messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"]}}}


def test_tool_round_trip(oai):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(model="default", messages=messages, tools=[WEATHER, TIME], max_tokens=80,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                    temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    final = oai.chat.completions.create(model="default", messages=messages, tools=[WEATHER, TIME], max_tokens=40,
                                        tool_choice="none", temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_streamed_tool_calls_reassemble_to_the_whole_answer(oai):
    kw = dict(model="default", messages=[{"role": "user", "content": "Weather in Oslo and the time in Tokyo?"}],
              tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=120,
              temperature=1.0, seed=4)
    whole = oai.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in oai.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                slot["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for c in whole.message.tool_calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[c.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)
