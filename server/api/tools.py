"""Tool calling: which tools a request offers and how the model is told about them, the grammar that enforces
`required` and named choices, and the parser that turns generated text into OpenAI `tool_calls` (whole, or as
streamed deltas: the same parser serves both, so a stream reassembles to exactly the non-streamed answer).

Formats (server/api/tool_formats/, one module each): Hermes/Qwen (`<tool_call>{"name": ..., "arguments": ...}
</tool_call>`), Llama 3 JSON, Qwen3-Coder XML, pythonic lists and Mistral's `[TOOL_CALLS]`. `--tool-call-parser`
names one; by default the chat template's markers decide, else Hermes. A chat template that renders tools itself
(transformers' `apply_chat_template(tools=...)`) gets them; a template without tool support gets them in a system
prompt written for the format, and earlier calls and tool results are written in the same format."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ToolCall
from server.api.tool_formats import FORMATS, PARSERS, Event, ToolFormat, ToolPlan, detect_format, dialect, new_call_id
from server.api.tool_formats.stream import StreamParser
from server.engine import GrammarSpec, InvalidRequestError
from server.engine.json_schema import enforceable_schema

__all__ = ["Event", "ToolCallParser", "ToolPlan", "check_tool_messages", "forced_spec", "new_call_id",
           "parse_tool_calls", "plan_tools", "special_markers", "template_messages"]

def plan_tools(body: ChatCompletionRequest, chat_template: str | None, parser: str | None = None) -> ToolPlan | None:
    """What the request asks of tools (None: no tools in play). 400s name the offending field. `parser`: the
    `--tool-call-parser` format (None: the chat template's)."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tool names must be unique", param="tools")
    name = None
    if choice is None or isinstance(choice, str):
        mode = choice or "auto"
    else:
        mode, name = "named", choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})",
                           param="tool_choice")
    template = chat_template or ""
    native = "tools" in template
    fmt = PARSERS[parser] if parser else detect_format(template)
    plan = ToolPlan(tools, mode, name, body.parallel_tool_calls, native, fmt, dialect(fmt, template))
    if plan.forced:
        for i, t in enumerate(tools):
            if name is None or t["function"]["name"] == name:
                params = t["function"].get("parameters")
                if params is not None:
                    try:
                        enforceable_schema(params, f"tools.{i}.function.parameters")
                    except InvalidRequestError as exc:
                        raise APIError(400, str(exc), param=exc.param) from None
    return plan


def check_tool_messages(messages: list) -> None:
    """Each `tool` message answers, by `tool_call_id`, a call of the assistant message before it (tool results may
    follow one another): anything else is a conversation no template renders faithfully."""
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":
            open_calls = {c.id for c in m.tool_calls or ()}
        elif m.role != "tool":
            open_calls = set()
        elif not m.tool_call_id:
            raise APIError(400, "a tool message needs tool_call_id (the id of the call it answers)",
                           param=f"messages.{i}.tool_call_id")
        elif m.tool_call_id not in open_calls:
            raise APIError(400, f"tool message {i} answers {m.tool_call_id!r}, which is not an unanswered tool call "
                                f"of the assistant message before it", param=f"messages.{i}.tool_call_id")
        else:
            open_calls.discard(m.tool_call_id)


def forced_spec(plan: ToolPlan) -> GrammarSpec:
    """The structural tag that only lets the model emit calls (at least one; one only when not parallel or named),
    each of a function in `tools`, in the plan's format, with arguments held to its parameters as far as the format
    lets a grammar (see each format's module)."""
    return GrammarSpec.structural_tag({"type": "structural_tag", "format": FORMATS[plan.fmt].forced(plan)})


def special_markers(plan: ToolPlan | None) -> bool:
    """The plan's format marks calls with special tokens, which detokenizing must keep."""
    return plan is not None and FORMATS[plan.fmt].special_markers


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: with tools in a system prompt when the template cannot render
    them, and earlier calls and tool results written out in the plan's format."""
    native = plan is not None and plan.native
    fmt = FORMATS[plan.fmt if plan is not None else "hermes"]
    out = [(_native_message if native else _text_message)(dict(m), fmt, plan) for m in messages]
    if plan is not None and not native:
        prompt = fmt.prompt.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _native_message(m: dict[str, Any], fmt: ToolFormat, plan: ToolPlan | None) -> dict[str, Any]:
    """Calls with their arguments as objects, as templates iterate them; ids as the format's templates take them."""
    ids = fmt.native_id or (lambda call_id: call_id)
    if m.get("tool_calls"):
        m["tool_calls"] = [{"id": ids(c["id"]), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}} for c in m["tool_calls"]]
    if m.get("tool_call_id"):
        m["tool_call_id"] = ids(m["tool_call_id"])
    return m


def _text_message(m: dict[str, Any], fmt: ToolFormat, plan: ToolPlan | None) -> dict[str, Any]:
    calls = m.pop("tool_calls", None)
    if calls:
        text = fmt.calls_text([c["function"] for c in calls], plan.dialect if plan is not None else "")
        m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + [text])
    if m["role"] == "tool":
        m["content"] = fmt.result_text(m.get("content") or "")
        m.pop("tool_call_id", None)
    return m


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


@dataclass
class ToolCallParser:
    """Feeds on generated text, emits content and tool-call events in the plan's format. Text that may start a call
    is held back until it is clear; a call's arguments stream as they are generated where the format allows."""
    plan: ToolPlan
    format_parser: StreamParser = field(init=False)

    def __post_init__(self) -> None:
        self.format_parser = FORMATS[self.plan.fmt].parser(self.plan)

    @property
    def calls(self) -> list[ToolCall]:
        return self.format_parser.calls

    def feed(self, text: str) -> list[Event]:
        return self._allowed(self.format_parser.feed(text))

    def finish(self) -> list[Event]:
        return self._allowed(self.format_parser.finish())

    def _allowed(self, events: list[Event]) -> list[Event]:
        """Without parallel calls only the first call goes out. A forced call's grammar allows no content: text that
        is not a call is one cut short (by max_tokens), not an answer."""
        if self.plan.forced:
            events = [e for e in events if e.kind != "content"]
        return events if self.plan.parallel else [e for e in events if e.kind == "content" or e.index == 0]


def parse_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """Content and tool calls of a whole answer."""
    parser = ToolCallParser(plan)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    calls = parser.calls if plan.parallel else parser.calls[:1]
    return content or None, calls
