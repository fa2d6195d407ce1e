"""Tool calling: which tools a request offers and how the model is told about them, the grammar that enforces
`required` and named choices, and the parser that turns generated text into OpenAI `tool_calls` (whole, or as
streamed deltas: the same parser serves both, so a stream reassembles to exactly the non-streamed answer).

Formats. A chat template that renders tools itself (transformers' `apply_chat_template(tools=...)`) gets them; its
call format is Hermes/Qwen (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`) unless the template speaks
Llama 3's bare JSON (`{"name": ..., "parameters": ...}`). A template without tool support gets the tools in a system
prompt (TOOL_PROMPT below, Hermes format), and earlier calls and tool results are written in the same format."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, FunctionCall, ToolCall
from server.engine import GrammarSpec, InvalidRequestError
from server.engine.json_schema import check_schema

TOOL_PROMPT = """You can call functions. These are the functions available, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each exactly:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Otherwise answer the user directly."""
OPEN, CLOSE = "<tool_call>", "</tool_call>"
ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool objects, as plain dicts
    mode: Literal["auto", "required", "named"]
    name: str | None  # the named function
    parallel: bool
    native: bool  # the chat template renders tools itself
    fmt: Literal["hermes", "llama3"]

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def plan_tools(body: ChatCompletionRequest, chat_template: str | None) -> ToolPlan | None:
    """What the request asks of tools (None: no tools in play). 400s name the offending field."""
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
    fmt = "llama3" if native and "<tool_call>" not in template and "ipython" in template else "hermes"
    plan = ToolPlan(tools, mode, name, body.parallel_tool_calls, native, fmt)
    if plan.forced:
        for i, t in enumerate(tools):
            if name is None or t["function"]["name"] == name:
                params = t["function"].get("parameters")
                if params is not None:
                    try:
                        check_schema(params, f"tools.{i}.function.parameters")
                    except InvalidRequestError as exc:
                        raise APIError(400, str(exc), param=exc.param) from None
    return plan


def forced_spec(plan: ToolPlan) -> GrammarSpec:
    """The structural tag that only lets the model emit calls (at least one; one only when not parallel or named),
    each of a function in `tools` with arguments valid against its parameters."""
    tags = []
    for t in plan.tools:
        fn = t["function"]
        if plan.name is not None and fn["name"] != plan.name:
            continue
        head = json.dumps(fn["name"])
        if plan.fmt == "llama3":
            begin, end = '{"name": ' + head + ', "parameters": ', "}"
        else:
            begin, end = OPEN + '\n{"name": ' + head + ', "arguments": ', "}\n" + CLOSE
        schema = fn.get("parameters") or ANY_OBJECT
        tags.append({"type": "tag", "begin": begin, "end": end,
                     "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 2}})
    single = plan.mode == "named" or not plan.parallel or plan.fmt == "llama3"
    return GrammarSpec.structural_tag({"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
        "stop_after_first": single}})


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: with tools in a system prompt when the template cannot render
    them, and earlier calls and tool results written out in the same format."""
    native = plan is not None and plan.native
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            if native:
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}} for c in calls]
            else:
                blocks = [f'{OPEN}\n{{"name": {json.dumps(c["function"]["name"])}, "arguments": '
                          f'{c["function"]["arguments"]}}}\n{CLOSE}' for c in calls]
                m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        if m["role"] == "tool" and not native:
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if plan is not None and not native:
        prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Event:
    kind: Literal["content", "call", "arguments"]
    text: str = ""
    index: int = 0  # the call's index (call, arguments)
    id: str = ""  # call


# a call's opening up to its arguments' first character (so that all whitespace before them is matched here)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


@dataclass
class ToolCallParser:
    """Feeds on generated text, emits content and tool-call events. Text that may start a call is held back until
    it is clear; a call's arguments stream as they are generated."""
    plan: ToolPlan
    state: Literal["text", "head", "args", "tail", "llama"] = "text"
    buf: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    started: bool = False  # any content emitted yet
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _after_call: bool = False

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(events, final=False)
            if (self.state, len(self.buf)) == before:
                return self._allowed(events)

    def finish(self) -> list[Event]:
        events: list[Event] = []
        for _ in range(8):  # each state hands what it cannot finish to the next
            state = self.state
            getattr(self, f"_{state}")(events, final=True)
            if self.state == state and not self.buf:
                break
        return self._allowed(events)

    def _allowed(self, events: list[Event]) -> list[Event]:
        """Without parallel calls only the first call goes out."""
        return events if self.plan.parallel else [e for e in events if e.kind == "content" or e.index == 0]

    # -- states ---------------------------------------------------------------------------------------------------
    def _text(self, events: list[Event], final: bool) -> None:
        if self.plan.fmt == "llama3" and not self.started and not self.calls:
            stripped = self.buf.lstrip()
            if stripped.startswith(("{", "<|python_tag|>")):
                self.state = "llama"
                return
            if not stripped and not final:
                return
        at = self.buf.find(OPEN)
        if at >= 0:
            self._content(events, self.buf[:at].rstrip())
            self.buf, self.state = self.buf[at + len(OPEN):], "head"
            return
        if final:
            self._content(events, self.buf.rstrip())
            self.buf = ""
            return
        hold = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1) if self.buf.endswith(OPEN[:k])), 0)
        ready = self.buf[:len(self.buf) - hold].rstrip()  # trailing whitespace waits too: a call may follow it
        self._content(events, ready)
        self.buf = self.buf[len(ready):]

    def _content(self, events: list[Event], text: str) -> None:
        if not self.started or self._after_call:  # no whitespace at the start, nor glued to a call
            text = text.lstrip()
        if text:
            self.started, self._after_call = True, False
            events.append(Event("content", text))

    def _head(self, events: list[Event], final: bool) -> None:
        match = _HEAD.match(self.buf)
        if match is not None and json.loads(f'"{match.group(1)}"') in self.plan.names:
            self._start_call(events, json.loads(f'"{match.group(1)}"'))
            self.buf, self.state = self.buf[match.end():], "args"
            self._depth, self._in_string, self._escape = 0, False, False
            return
        end = self.buf.find(CLOSE)
        if end >= 0 or final:  # a whole block that does not start the usual way: parse it whole
            block = self.buf[:end] if end >= 0 else self.buf
            self.buf = self.buf[end + len(CLOSE):] if end >= 0 else ""
            self.state, self._after_call = "text", True
            if not self._whole_call(events, block) and end >= 0:  # an unfinished block at the end is dropped
                self._content(events, OPEN + block + CLOSE)

    def _args(self, events: list[Event], final: bool) -> None:
        i, done = 0, False
        for i, ch in enumerate(self.buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        if not self.buf:
            return
        piece, self.buf = self.buf[:i + 1], self.buf[i + 1:]
        if piece:
            events.append(Event("arguments", piece, len(self.calls) - 1))
            self.calls[-1].function.arguments += piece
        if done:
            self.state = "tail"

    def _tail(self, events: list[Event], final: bool) -> None:
        end = self.buf.find(CLOSE)
        if end >= 0:
            self.buf, self.state, self._after_call = self.buf[end + len(CLOSE):], "text", True
        elif final:
            self.buf, self.state = "", "text"

    def _llama(self, events: list[Event], final: bool) -> None:
        if not final:
            return
        text = self.buf.strip().removeprefix("<|python_tag|>")
        self.buf, self.state = "", "text"
        parts = [p for p in text.split(";") if p.strip()]
        if not parts or not all(self._whole_call([], p, dry=True) for p in parts):
            self.started = True
            events.append(Event("content", text))
            return
        for p in parts:
            self._whole_call(events, p)

    # -- calls ----------------------------------------------------------------------------------------------------
    def _start_call(self, events: list[Event], name: str) -> None:
        call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=""))
        self.calls.append(call)
        events.append(Event("call", name, len(self.calls) - 1, call.id))

    def _whole_call(self, events: list[Event], text: str, dry: bool = False) -> bool:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return False
        if not isinstance(obj, dict) or obj.get("name") not in self.plan.names:
            return False
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(args, dict):
            return False
        if not dry:
            self._start_call(events, obj["name"])
            arguments = json.dumps(args, ensure_ascii=False)
            self.calls[-1].function.arguments = arguments
            events.append(Event("arguments", arguments, len(self.calls) - 1))
        return True


def parse_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """Content and tool calls of a whole answer."""
    parser = ToolCallParser(plan)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    calls = parser.calls if plan.parallel else parser.calls[:1]
    return content or None, calls
