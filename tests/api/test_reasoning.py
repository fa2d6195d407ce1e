"""Reasoning output: the `<think>` parser alone (every way of cutting a stream reassembles to the whole-text split),
where an answer's thinking starts, the grammar that lets a model think before its structured answer, and chat's
`reasoning_content` / `reasoning`, streamed and not, over scripted answers and the dummy model."""
from __future__ import annotations

import asyncio
import itertools
import json
import random

import pytest
import xgrammar as xgr
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.answer import AnswerParser, parse_answer
from server.api.reasoning import ReasoningSetup, reasoning_setup
from server.api.reasoning_grammar import after_thinking
from server.api.tools import ToolPlan
from server.engine import GrammarSpec, InvalidRequestError
from tests.support.scripted import ScriptedEngine
from tests.support.servers import make_app, wait_ready

THINKING = ReasoningSetup("deepseek_r1", True)
PLAIN = ReasoningSetup("qwen3", False)
TOOLS = ToolPlan([{"type": "function", "function": {"name": "f"}}], "auto", None, True, False, "hermes")


def streamed(setup: ReasoningSetup, pieces: list[str]) -> tuple[str, str]:
    parser, reasoning, content = setup.parser(), [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return "".join(reasoning + [r]), "".join(content + [c])


@pytest.mark.parametrize("setup, text, expected", [
    (THINKING, "<think>\nStep one.\n</think>\n\nThe answer.", ("Step one.", "The answer.")),
    (THINKING, "Step one, no opening tag.\n</think>\n\nThe answer.", ("Step one, no opening tag.", "The answer.")),
    (THINKING, "  <think>cut off before the end", ("cut off before the end", "")),
    (THINKING, "<think></think>only content", ("", "only content")),
    (THINKING, "a <th b</thi c</think> x </think> y", ("a <th b</thi c", "x </think> y")),
    (THINKING, "<thin", ("<thin", "")),
    (THINKING, "", ("", "")),
    (PLAIN, "<think>kept as content</think> ", ("", "<think>kept as content</think> ")),
])
def test_whole_split(setup, text, expected):
    assert setup.split(text) == expected
    assert streamed(setup, [text]) == expected


@pytest.mark.parametrize("text", ["<think> a\n</think>\n b", " x </t</think>y", "<th<think>z</think>", "a\n \n</th"])
def test_every_cut_of_a_short_stream_reassembles(text):
    for setup in (THINKING, PLAIN):
        whole = setup.split(text)
        for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, len(text)), k) for k in range(4)):
            bounds = [0, *cuts, len(text)]
            assert streamed(setup, [text[a:b] for a, b in zip(bounds, bounds[1:])]) == whole, cuts


PIECES = st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think", ">", "/", " ", "\n", "a", "bc"]),
                  max_size=14)


@given(words=PIECES, seed=st.integers(0, 2 ** 16))
@settings(max_examples=300, deadline=None)
def test_random_streams_reassemble(words, seed):
    text, rng = "".join(words), random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    for setup in (THINKING, PLAIN):
        reasoning, content = streamed(setup, pieces)
        assert (reasoning, content) == setup.split(text)
        assert "</think>" not in reasoning


@pytest.mark.parametrize("fmt, tail, kwargs, thinking", [
    ("deepseek_r1", "<|im_start|>assistant\n", None, True),
    ("deepseek_r1", "<|im_start|>assistant\n<think>\n", None, True),
    ("deepseek_r1", "assistant\n<think>\n\n</think>\n\n", None, False),
    ("qwen3", "<|im_start|>assistant\n", None, True),
    ("qwen3", "<|im_start|>assistant\n", {"enable_thinking": False}, False),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", {"enable_thinking": False}, False),
    ("qwen3", "<|im_start|>assistant\n<think>\n", {"enable_thinking": False}, True),
])
def test_where_the_thinking_starts(fmt, tail, kwargs, thinking):
    assert reasoning_setup(fmt, tail, kwargs) == ReasoningSetup(fmt, thinking)


def test_flag_and_environment(monkeypatch):
    import argparse

    from server.api import ServerSettings
    from server.cli.args import settings_of
    from server.cli.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert ServerSettings().reasoning_parser is None
    args = parser.parse_args(["serve", "--reasoning-parser", "qwen3"])
    assert settings_of(ServerSettings, args).reasoning_parser == "qwen3"
    monkeypatch.setenv("LOOM_REASONING_PARSER", "deepseek_r1")
    assert settings_of(ServerSettings, parser.parse_args(["serve"])).reasoning_parser == "deepseek_r1"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--reasoning-parser", "o1"])


def test_no_parser_and_unknown_parser():
    assert reasoning_setup(None, "<think>", None) is None
    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'"):
        reasoning_setup("o1", "", None)


def test_tools_are_parsed_after_the_thinking():
    text = ('<think>I could write <tool_call> here.</think>\n\nSure. <tool_call>\n{"name": "f", "arguments": '
            '{"x": 1}}\n</tool_call>')
    whole = parse_answer(text, TOOLS, THINKING)
    assert (whole.reasoning, whole.content) == ("I could write <tool_call> here.", "Sure.")
    assert [(c.function.name, c.function.arguments) for c in whole.calls] == [("f", '{"x": 1}')]
    rng = random.Random(1)
    for _ in range(20):
        parser, events, i = AnswerParser.of(TOOLS, THINKING), [], 0
        while i < len(text):
            k = rng.randint(1, 7)
            events += parser.feed(text[i:i + k])
            i += k
        events += parser.finish()
        assert "".join(e.text for e in events if e.kind == "reasoning") == whole.reasoning
        assert "".join(e.text for e in events if e.kind == "content") == whole.content
        assert "".join(e.text for e in events if e.kind == "arguments") == '{"x": 1}'
    assert parse_answer("<think>only thinking", None, THINKING).content is None
    assert parse_answer("", None, None).content == ""  # no parser: the text as it was


@pytest.mark.parametrize("spec, good, bad", [
    (GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
     '<think>Let me see: {"a": "x"}?</think>\n\n{"a": 1}', 'no thinking {"a": 1}'),
    (GrammarSpec.choice(["yes", "no"]), "hmm</think>\nyes", "hmm</think>maybe"),
    (GrammarSpec("regex", "[a-c]{3}"), "</think>abc", "</think>abcd"),
    (GrammarSpec("grammar", 'root ::= "a" "b"+'), "x</think>abb", "x</think>ba"),
    (GrammarSpec.structural_tag({"type": "structural_tag", "format": {"type": "const_string", "value": "call"}}),
     "<think>t</think>call", "<think>t</think>cal"),
])
def test_grammar_allows_free_thinking_then_enforces(dummy_engine, spec, good, bad):
    grammar = asyncio.run(dummy_engine.compile_grammar(after_thinking(spec, "response_format")))
    for text, complete in ((good, True), (bad, False)):
        matcher = xgr.GrammarMatcher(grammar.compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == complete, text


def test_grammar_after_thinking_checks_the_schema():
    with pytest.raises(InvalidRequestError) as err:
        after_thinking(GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "response_format")
    assert err.value.param == "response_format" and "uniqueItems" in str(err.value)


@pytest.fixture(scope="module")
def scripted(dummy_engine):
    engine = ScriptedEngine(dummy_engine)
    with TestClient(make_app(engine, reasoning_parser="qwen3")) as c:
        wait_ready(c.get)
        yield c, engine


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}


def test_chat_reasoning_content_whole_and_streamed(scripted):
    client, engine = scripted
    engine.pieces = ["<thi", "nk>\nPlan", ": add.", "\n</", "think>\n\n", "4", "2"]
    message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "42", "reasoning_content": "Plan: add.",
                       "reasoning": "Plan: add.", "tool_calls": None}
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Plan: add."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "42"
    assert not any("think" in (d.get("content") or "") for d in deltas)


def test_chat_thinking_disabled_leaves_content_alone(scripted):
    client, engine = scripted
    engine.pieces = ["no ", "thinking here"]
    body = {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == "no thinking here" and message["reasoning_content"] is None


def test_chat_tool_calls_after_reasoning(scripted):
    client, engine = scripted
    engine.pieces = ["<think>call f</think>", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>']
    body = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["reasoning_content"] == "call f"
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"][0]["function"]["arguments"] == \
        '{"x": 1}'


def test_structured_output_with_reasoning_on_the_dummy_model(dummy_engine):
    with TestClient(make_app(dummy_engine, reasoning_parser="deepseek_r1")) as c:
        wait_ready(c.get)
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        body = {**CHAT, "max_tokens": 12, "temperature": 1.0, "seed": 3,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        # a random model never closes its thinking: the constrained answer never starts, and nothing leaks into it
        assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
        assert choice["message"]["reasoning_content"] and choice["message"]["reasoning"]
        bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "uniqueItems": True}}}}
        r = c.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
