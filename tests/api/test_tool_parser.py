"""The tool-call parser on its own: Hermes/Qwen `<tool_call>` blocks and Llama 3 JSON calls out of free text, and
the same answer whether the text arrives whole or in random pieces (what streaming relies on)."""
from __future__ import annotations

import random

import pytest

from server.api.tools import ToolCallParser, ToolPlan, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "f"}}]
HERMES = ToolPlan(TOOLS, "auto", None, True, False, "hermes")
LLAMA = ToolPlan(TOOLS, "auto", None, True, True, "llama3")


@pytest.mark.parametrize("text, content, calls", [
    ('Sure! <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}", "n": [1, {"a": "}"}]}}\n'
     '</tool_call>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> done', "Sure!done",
     [("get_weather", '{"city": "Paris {x}", "n": [1, {"a": "}"}]}'), ("f", "{}")]),
    ("plain text with < and <tool", "plain text with < and <tool", []),
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>', None, [("f", '{"a": 1}')]),
    ('<tool_call>\n{"name": "unknown", "arguments": 3}</tool_call>', '<tool_call>\n{"name": "unknown", "arguments": 3}'
     '</tool_call>', []),
    ('<tool_call>\n{"name": "get_weather", "arg', None, []),  # cut off before the arguments: dropped
])
def test_hermes_whole_and_streamed_agree(text, content, calls):
    got_content, got_calls = parse_tool_calls(HERMES, text)
    assert got_content == content
    assert [(c.function.name, c.function.arguments) for c in got_calls] == calls
    rng = random.Random(0)
    for _ in range(30):
        parser, events, i = ToolCallParser(HERMES), [], 0
        while i < len(text):
            k = rng.randint(1, 6)
            events += parser.feed(text[i:i + k])
            i += k
        events += parser.finish()
        assert ("".join(e.text for e in events if e.kind == "content") or None) == content
        names = [e.text for e in events if e.kind == "call"]
        args = ["".join(e.text for e in events if e.kind == "arguments" and e.index == n) for n in range(len(names))]
        assert list(zip(names, args)) == calls


def test_llama3_json_calls():
    content, calls = parse_tool_calls(LLAMA, ' {"name": "f", "parameters": {"x": 1}}; {"name": "get_weather", '
                                              '"parameters": {}}')
    assert content is None and [(c.function.name, c.function.arguments) for c in calls] == \
        [("f", '{"x": 1}'), ("get_weather", "{}")]
    assert parse_tool_calls(LLAMA, '{"name": "nope", "parameters": {}}') == ('{"name": "nope", "parameters": {}}', [])
    assert parse_tool_calls(LLAMA, 'hello {"name": "f"}') == ('hello {"name": "f"}', [])


def test_single_call_without_parallel_tool_calls():
    plan = ToolPlan(TOOLS, "auto", None, False, False, "hermes")
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": {"b": 2}}</tool_call>'
    assert len(parse_tool_calls(plan, text)[1]) == 1
    parser = ToolCallParser(plan)
    events = parser.feed(text) + parser.finish()
    assert {e.index for e in events if e.kind != "content"} == {0}
