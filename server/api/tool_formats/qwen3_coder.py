"""Qwen3-Coder XML calls:

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE
    </parameter>
    </function>
    </tool_call>

Each value becomes a member of the `arguments` JSON object, converted by the parameter's schema type as vLLM's
qwen3_coder parser does: strings (and parameters of no or unknown type) are kept raw, less the newline after
`<parameter=P>` and the one before `</parameter>`; numbers, booleans, objects and arrays are parsed as JSON (kept as
a string when they do not parse); `null` is None where the type allows it. Strings the schema constrains (enum,
const, pattern, format, length) lose all surrounding whitespace, as the grammar lets whitespace pad them. Plain
string values stream as they are written; other values go out once closed.

The forced-call grammar is xgrammar's `qwen_xml` rendering of the parameters schema: function names, parameter
names and order, required parameters and every value's schema are enforced."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.api.tool_formats.base import Event, ToolPlan, tags_format
from server.api.tool_formats.format import ToolFormat
from server.api.tool_formats.stream import StreamParser, held, json_piece

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNC, FUNC_END, PARAM, PARAM_END = "<function=", "</function>", "<parameter=", "</parameter>"
CONSTRAINTS = {"enum", "const", "pattern", "format", "minLength", "maxLength"}  # a string with one is not plain
PROMPT = """You can call functions. These are the functions available, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each exactly (one <parameter> per argument):
<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
<parameter=example_parameter_2>
This is the value for the second parameter
that can span
multiple lines
</parameter>
</function>
</tool_call>
Otherwise answer the user directly."""


def value_types(schema: Any) -> set[str]:
    """The JSON types a parameter's schema names (by `type`, or by its `enum`/`const` values)."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    if kind is not None:
        return {kind} if isinstance(kind, str) else set(kind)
    values = schema.get("enum", [schema["const"]] if "const" in schema else [])
    return {"boolean" if isinstance(v, bool) else "string" if isinstance(v, str) else "null" if v is None
            else "number" if isinstance(v, (int, float)) else "object" for v in values}


def padded(schema: Any) -> bool:
    """xgrammar's qwen_xml grammar allows whitespace around this value (all but plain strings)."""
    types = value_types(schema)
    return bool(types - {"string"}) or isinstance(schema, dict) and not CONSTRAINTS.isdisjoint(schema)


def convert(value: str, schema: Any) -> Any:
    types = value_types(schema)
    if "null" in types and value.strip() == "null":
        return None
    if not types or "string" in types:
        return value.strip() if padded(schema) else value
    try:
        return json.loads(value, parse_constant=_no_constant)
    except ValueError:  # JSONDecodeError included
        pass
    if "boolean" in types and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json reads them, JSON has none


@dataclass
class Qwen3CoderParser(StreamParser):
    wrapped: bool = False  # the call is inside <tool_call> (the model may leave that out)
    members: int = 0  # parameters written into the current call's arguments
    param: str = ""
    schema: Any = None  # the current parameter's schema
    raw: bool = True  # the current value is a plain string, streamed as it comes
    value_start: bool = True  # the newline after <parameter=P> is not yet dropped

    def _text(self, events: list[Event], final: bool) -> None:
        found = self.text_until(events, final, (OPEN, FUNC))
        if found is not None:
            marker, end = found
            self.pending, self.buf = marker, self.buf[end:]
            self.state, self.wrapped = ("open", True) if marker == OPEN else ("name", False)

    def _open(self, events: list[Event], final: bool) -> None:
        s = self.buf.lstrip()
        if s.startswith(FUNC):
            self.pending += self.buf[:len(self.buf) - len(s) + len(FUNC)]
            self.buf, self.state = s[len(FUNC):], "name"
        elif not FUNC.startswith(s):
            self.not_a_call(events)
        elif final:  # a call cut short: dropped
            self.pending, self.buf, self.state = "", "", "text"

    def _name(self, events: list[Event], final: bool) -> None:
        at = self.buf.find(">")
        if at >= 0 and self.buf[:at].strip() in self.plan.names:
            self.start_call(events, self.buf[:at].strip())
            self.buf, self.state, self.members = self.buf[at + 1:], "body", 0
        elif at >= 0 or "\n" in self.buf or "<" in self.buf or len(self.buf) > 64:
            self.not_a_call(events)
        elif final:
            if any(n.startswith(self.buf.strip()) for n in self.plan.names):  # a call cut short: dropped
                self.pending, self.buf = "", ""
            self.not_a_call(events)

    def _body(self, events: list[Event], final: bool) -> None:
        """Between parameters: the next one, or the function's end. Stray text there is skipped."""
        s = self.buf.lstrip()
        if s.startswith(PARAM) and (at := s.find(">")) >= 0:
            self._open_value(events, s[len(PARAM):at].strip())
            self.buf = s[at + 1:]
        elif s.startswith((FUNC_END, CLOSE)):
            self._close_call(events)
            self.buf, self.state = s[len(FUNC_END):] if s.startswith(FUNC_END) else s[len(CLOSE):], "tail"
            self.wrapped &= s.startswith(FUNC_END)
        elif final:
            self._close_call(events)
            self.buf, self.state = "", "text"
        elif not s.startswith(PARAM) and not any(m.startswith(s) for m in (PARAM, FUNC_END, CLOSE)):
            nxt = s.find("<", 1)
            self.buf = s[nxt:] if nxt >= 0 else ""

    def _value(self, events: list[Event], final: bool) -> None:
        if self.value_start and (self.buf or final):
            self.buf, self.value_start = self.buf.removeprefix("\n"), False
        at = self.buf.find(PARAM_END)
        if at >= 0 or final:
            value = self.buf[:at] if at >= 0 else self.buf
            self.buf, self.state = (self.buf[at + len(PARAM_END):], "body") if at >= 0 else ("", "body")
            self._close_value(events, value.removesuffix("\n"))
        elif self.raw:
            keep = held(self.buf, ("\n" + PARAM_END, PARAM_END))
            self.arguments(events, json_piece(self.buf[:len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]

    def _tail(self, events: list[Event], final: bool) -> None:
        s = self.buf.lstrip()
        if self.wrapped and s.startswith(CLOSE):
            self.buf, self.state = s[len(CLOSE):], "text"
        elif not self.wrapped or not CLOSE.startswith(s) or final:
            self.state = "text"
        self.after_call = True

    # -- arguments ------------------------------------------------------------------------------------------------
    def _open_value(self, events: list[Event], name: str) -> None:
        schema = self.plan.parameters(self.calls[-1].function.name).get(name)
        self.param, self.schema, self.raw = name, schema, not padded(schema)
        self.value_start, self.state = True, "value"
        if self.raw:
            self.arguments(events, self._key() + '"')

    def _close_value(self, events: list[Event], value: str) -> None:
        if self.raw:
            self.arguments(events, json_piece(value) + '"')
        else:
            self.arguments(events, self._key() + json.dumps(convert(value, self.schema), ensure_ascii=False))

    def _key(self) -> str:
        self.members += 1
        return ("{" if self.members == 1 else ", ") + json.dumps(self.param, ensure_ascii=False) + ": "

    def _close_call(self, events: list[Event]) -> None:
        self.arguments(events, "}" if self.members else "{}")


def forced(plan: ToolPlan) -> dict:
    tags = [{"type": "tag", "begin": f"{OPEN}\n{FUNC}{name}>\n", "end": f"\n{FUNC_END}\n{CLOSE}",
             "content": {"type": "json_schema", "json_schema": schema, "style": "qwen_xml", "max_whitespace_cnt": 2}}
            for name, schema in plan.forced_functions()]
    return tags_format(tags, "\n", plan.single)


def calls_text(calls: list[dict[str, str]], dialect: str) -> str:
    blocks = []
    for c in calls:
        try:
            args = json.loads(c["arguments"])
        except json.JSONDecodeError:
            args = {}
        params = "".join(f"{PARAM}{k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n{PARAM_END}\n"
                         for k, v in (args.items() if isinstance(args, dict) else ()))
        blocks.append(f"{OPEN}\n{FUNC}{c['name']}>\n{params}{FUNC_END}\n{CLOSE}")
    return "\n".join(blocks)


def result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


FORMAT = ToolFormat("qwen3_coder", lambda template: FUNC in template and PARAM in template, Qwen3CoderParser,
                    forced, PROMPT, calls_text, result_text)
