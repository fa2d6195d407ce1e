"""Tool-call formats beyond Hermes: Qwen3-Coder XML, pythonic lists, Mistral `[TOOL_CALLS]` (and Llama 3 JSON).
For each: whole answers parse to the expected content and calls, every way of cutting the text into stream pieces
reassembles to that parse, malformed calls stay content, calls written into a prompt parse back to themselves, the
forced-call grammar on the dummy model gives calls whose arguments validate against the schema, and the chat
template's markers pick the format unless `--tool-call-parser` names one."""
from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.protocol import ChatCompletionRequest
from server.api.tool_formats import FORMATS
from server.api.tools import ToolCallParser, ToolPlan, parse_tool_calls, plan_tools, special_markers, template_messages
from tests.support.servers import make_app, make_engine, wait_ready

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["c", "f"]}, "hourly": {"type": "boolean"}}, "required": ["city", "unit"]}
F = {"type": "object", "properties": {"x": {"type": "array"}, "s": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "f", "parameters": F}}]


def plan(fmt: str, dialect: str = "", parallel: bool = True) -> ToolPlan:
    return ToolPlan(TOOLS, "auto", None, parallel, False, fmt, dialect)


QWEN = [
    ('Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork "NY"\n</parameter>\n'
     '<parameter=days>\n3\n</parameter>\n<parameter=hourly>\nTrue\n</parameter>\n<parameter=extra>\n{"a": 1}\n'
     '</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=f>\n</function>\n</tool_call>',
     "Let me look.", [("get_weather", '{"city": "New\\nYork \\"NY\\"", "days": 3, "hourly": true, '
                                      '"extra": "{\\"a\\": 1}"}'), ("f", "{}")]),
    # no <tool_call> around the function; a value that is not its type's JSON stays a string; an enum's padding
    # goes; text after the call
    ("<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=unit> c\n</parameter>\n</function> ok",
     "ok", [("get_weather", '{"days": "three", "unit": "c"}')]),
    ("<tool_call>\n<function=unknown>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
     "<tool_call>\n<function=unknown>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>", []),
    ("a <tool_call> b <function x", "a<tool_call> b <function x", []),
    ("<tool_call>\n<function=get_wea", None, []),  # cut off in the name: dropped
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOs", None, [("get_weather", '{"city": "Os"}')]),
]
PYTHONIC = [
    (' [get_weather(city="Oslo", days=2, hourly=False, unit=\'c\'), f(x=(1, None), y={"k": [1.5]})]',
     None, [("get_weather", '{"city": "Oslo", "days": 2, "hourly": false, "unit": "c"}'),
            ("f", '{"x": [1, null], "y": {"k": [1.5]}}')]),
    ('<|python_start|>[f(s="a]b)\\"c")]<|python_end|>\nDone.', "Done.", [("f", '{"s": "a]b)\\"c"}')]),
    ("[get_weather(city=oslo)]", "[get_weather(city=oslo)]", []),  # a name, not a literal
    ('[get_weather("Oslo")]', '[get_weather("Oslo")]', []),  # positional
    ("[nope(x=1)] and more", "[nope(x=1)] and more", []),
    ("[1] is a footnote", "[1] is a footnote", []),
    ("Calling [f()]", "Calling [f()]", []),  # only a list that starts the answer is calls
    ("[f(x={1, 2})]", "[f(x={1, 2})]", []),  # a set: no JSON for it
    ('[get_weather(city="Os', None, []),  # cut off: dropped
]
MISTRAL = [
    ('Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
     '{"arguments": {"a": [1, "]"]}, "name": "f"}]', "Sure.",
     [("get_weather", '{"city": "Oslo", "unit": "c"}'), ("f", '{"a": [1, "]"]}')]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{}', None,
     [("get_weather", '{"city": "Oslo"}'), ("f", "{}")]),
    ('[TOOL_CALLS]nope[ARGS]{"x": 1}', '[TOOL_CALLS]nope[ARGS]{"x": 1}', []),
    ('[TOOL_CALLS][{"name": "nope", "arguments": {}}] ok', '[TOOL_CALLS][{"name": "nope", "arguments": {}}] ok', []),
    ("[TOOL_CALLS]get_wea", None, []),  # cut off: dropped
]
LLAMA3 = [('{"name": "f", "parameters": {"x": 1}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
           [("f", '{"x": 1}'), ("get_weather", '{"city": "Oslo"}')]),
          ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', [])]
CASES = [("qwen3_coder", *c) for c in QWEN] + [("pythonic", *c) for c in PYTHONIC] + \
        [("mistral", *c) for c in MISTRAL] + [("llama3", *c) for c in LLAMA3]


def streamed(p: ToolPlan, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    parser, events = ToolCallParser(p), []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    names = [e.text for e in events if e.kind == "call"]
    assert [e.index for e in events if e.kind == "call"] == list(range(len(names)))
    args = ["".join(e.text for e in events if e.kind == "arguments" and e.index == i) for i in range(len(names))]
    return "".join(e.text for e in events if e.kind == "content") or None, list(zip(names, args))


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_whole_answers_and_every_two_piece_stream(fmt, text, content, calls):
    got_content, got_calls = parse_tool_calls(plan(fmt), text)
    assert (got_content, [(c.function.name, c.function.arguments) for c in got_calls]) == (content, calls)
    for c in got_calls:
        json.loads(c.function.arguments)
    assert streamed(plan(fmt), list(text)) == (content, calls)
    for i in range(1, len(text)):
        assert streamed(plan(fmt), [text[:i], text[i:]]) == (content, calls), i


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_cut_of_a_stream_reassembles(data):
    fmt, text, content, calls = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert streamed(plan(fmt), pieces) == (content, calls)


def test_string_values_stream_while_written():
    parser = ToolCallParser(plan("qwen3_coder"))
    events = parser.feed("<tool_call>\n<function=f>\n<parameter=s>\n  Os")
    assert [(e.kind, e.text) for e in events] == [("call", "f"), ("arguments", '{"s": "'), ("arguments", "  Os")]
    assert [e.text for e in parser.feed("lo\n</param")] == ["lo"]  # the newline may end the value: held
    assert [e.text for e in parser.feed("eter>\n</function>")] == ['"', "}"]


def test_only_the_first_call_without_parallel_calls():
    text = '[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{"city": "x"}'
    assert [c.function.name for c in parse_tool_calls(plan("mistral", parallel=False), text)[1]] == ["f"]
    assert streamed(plan("pythonic", parallel=False), ["[f(), get_weather(city='x')]"]) == (None, [("f", "{}")])


# -- calls written into prompts ---------------------------------------------------------------------------------------
CALLS = [{"id": "call_1", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Oslo", "days": 2, "hourly": true, "unit": "c"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, null], "s": "a\\nb"}'}}]
CONVERSATION = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": CALLS},
                {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("fmt, dialect, written, result", [
    ("qwen3_coder", "", "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2"
                        "\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n<parameter=unit>\nc\n</parameter>\n"
                        "</function>\n</tool_call>\n<tool_call>\n<function=f>\n<parameter=x>\n[1, null]\n</parameter>"
                        "\n<parameter=s>\na\nb\n</parameter>\n</function>\n</tool_call>",
     "<tool_response>\n18 C\n</tool_response>"),
    ("pythonic", "", '[get_weather(city="Oslo", days=2, hourly=True, unit="c"), f(x=[1, None], s="a\\nb")]', "18 C"),
    ("mistral", "", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2, "hourly": true, '
                    '"unit": "c"}}, {"name": "f", "arguments": {"x": [1, null], "s": "a\\nb"}}]',
     "[TOOL_RESULTS]18 C[/TOOL_RESULTS]"),
    ("mistral", "args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2, "hourly": true, "unit": "c"}'
                        '[TOOL_CALLS]f[ARGS]{"x": [1, null], "s": "a\\nb"}', "[TOOL_RESULTS]18 C[/TOOL_RESULTS]"),
])
def test_earlier_calls_are_written_in_the_format_and_parse_back(fmt, dialect, written, result):
    messages = template_messages(CONVERSATION, plan(fmt, dialect))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == FORMATS[fmt].prompt.format(tools="\n".join(json.dumps(t) for t in TOOLS))
    assert messages[2]["content"] == written and "tool_calls" not in messages[2]
    assert messages[3] == {"role": "tool", "content": result}
    _, calls = parse_tool_calls(plan(fmt, dialect), written)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in CALLS]


def test_mistral_templates_get_nine_character_ids():
    native = ToolPlan(TOOLS, "auto", None, True, True, "mistral")
    messages = template_messages(CONVERSATION, native)
    call_id = messages[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and messages[2]["tool_call_id"] == call_id
    assert messages[1]["tool_calls"][1]["id"] != call_id
    assert messages[1]["tool_calls"][0]["function"]["arguments"]["city"] == "Oslo"
    assert special_markers(native) and not special_markers(plan("qwen3_coder")) and not special_markers(None)


# -- which format ---------------------------------------------------------------------------------------------------
TEMPLATES = {  # the telling lines of each family's chat template (tools rendered natively)
    "qwen3_coder": "{%- if tools %}<tools>{{ tool | tojson }}</tools>\nIf you choose to call a function ONLY reply in "
                   "the following format:\n<tool_call>\n<function=example_function_name>\n"
                   "<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>{%- endif %}",
    "hermes": "{%- if tools %}<tools>{{ tool | tojson }}</tools>\nFor each function call, return a json object within "
              "<tool_call></tool_call> XML tags{%- endif %}",
    "mistral": "{%- if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
               "{{- '[TOOL_CALLS] [' }}{{ tool_call.function | tojson }}",
    "pythonic": "{%- if tools is not none %}Environment: ipython\nRespond in the format [func_name1(params_name1="
                "params_value1, params_name2=params_value2...), func_name2(params)]{%- endif %}",
    "llama3": "{%- if tools is not none %}Environment: ipython\nRespond in the format {\"name\": function name, "
              "\"parameters\": dictionary of argument name and its value}.{%- endif %}<|python_tag|>",
    "plain": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
             "{% endfor %}",
}


def request(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, **extra)


@pytest.mark.parametrize("family, fmt, native", [("qwen3_coder", "qwen3_coder", True), ("hermes", "hermes", True),
                                                 ("mistral", "mistral", True), ("pythonic", "pythonic", True),
                                                 ("llama3", "llama3", True), ("plain", "hermes", False)])
def test_the_template_decides_the_format(family, fmt, native):
    p = plan_tools(request(), TEMPLATES[family])
    assert (p.fmt, p.native, p.dialect) == (fmt, native, "")


def test_newer_mistral_templates_write_args():
    p = plan_tools(request(), TEMPLATES["mistral"] + "{{- '[TOOL_CALLS]' + name + '[ARGS]' + arguments }}")
    assert (p.fmt, p.dialect) == ("mistral", "args")


def test_the_flag_overrides_the_template():
    assert plan_tools(request(), TEMPLATES["hermes"], "pythonic").fmt == "pythonic"
    assert plan_tools(request(), TEMPLATES["plain"], "llama3_json").fmt == "llama3"
    p = plan_tools(request(), "{{ tools }}[TOOL_CALLS]{{ name }}[ARGS]{{ arguments }}", "mistral")
    assert (p.fmt, p.dialect) == ("mistral", "args")


def test_flag_and_environment(monkeypatch):
    import argparse

    from server.api import ServerSettings
    from server.cli.args import settings_of
    from server.cli.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert ServerSettings().tool_call_parser is None
    assert settings_of(ServerSettings, parser.parse_args(["serve", "--tool-call-parser", "qwen3_coder"])) \
        .tool_call_parser == "qwen3_coder"
    monkeypatch.setenv("LOOM_TOOL_CALL_PARSER", "pythonic")
    assert settings_of(ServerSettings, parser.parse_args(["serve"])).tool_call_parser == "pythonic"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--tool-call-parser", "xml"])


# -- forced calls on the dummy model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(dummy_lm):
    """The dummy model, with time for grammars to compile on a busy machine (compiles run niced)."""
    engine = make_engine(dummy_lm, grammar_compile_timeout=120, grammar_compile_workers=1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module", params=["qwen3_coder", "pythonic", "mistral", "llama3_json"])
def served(request, engine):
    with TestClient(make_app(engine, tool_call_parser=request.param, warmup=False)) as client:
        wait_ready(client.get)
        yield client


def test_forced_calls_validate_against_the_schema(served):
    ping = {"type": "object", "properties": {}}  # no arguments (a random model would ramble in free ones)
    tools = [TOOLS[0], {"type": "function", "function": {"name": "ping", "parameters": ping}}]
    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools, "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 100, "temperature": 1.0, "seed": 3, "n": 3}
    r = served.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        (call,) = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, WEATHER if call["function"]["name"] == "get_weather" else ping)
    body = {**body, "n": 1, "temperature": 0, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = served.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(whole["function"]["arguments"]), WEATHER)
    with served.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines() if line.startswith("data: {")]
    pieces = [d["tool_calls"][0]["function"] for d in deltas if d.get("tool_calls")]
    assert pieces[0]["name"] == "get_weather" and "".join(p["arguments"] for p in pieces) == \
        whole["function"]["arguments"]
