"""Hermes / Qwen calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call. The
arguments stream as the model writes them (found by counting brackets); a block whose keys come in another order is
parsed whole when it closes. This is also the format of the system prompt for templates that cannot render tools."""
from __future__ import annotations

import json
import re

from server.api.tool_formats.base import Event, ToolPlan, json_tag, tags_format
from server.api.tool_formats.format import ToolFormat
from server.api.tool_formats.stream import StreamParser, ValueScan

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PROMPT = """You can call functions. These are the functions available, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each exactly:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Otherwise answer the user directly."""

# a call's opening up to its arguments' first character (so that all whitespace before them is matched here)
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


def json_call(plan: ToolPlan, text: str) -> tuple[str, str] | None:
    """(name, arguments) of a whole JSON call `{"name": ..., "arguments" | "parameters": {...}}` of a known
    function; None for anything else."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in plan.names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


class HermesParser(StreamParser):
    def _text(self, events: list[Event], final: bool) -> None:
        found = self.text_until(events, final, (OPEN,))
        if found is not None:
            self.buf, self.state = self.buf[found[1]:], "head"

    def _head(self, events: list[Event], final: bool) -> None:
        match = HEAD.match(self.buf)
        if match is not None and (name := json.loads(f'"{match.group(1)}"')) in self.plan.names:
            self.start_call(events, name)
            self.buf, self.state, self.scan = self.buf[match.end():], "args", ValueScan()
            return
        end = self.buf.find(CLOSE)
        if end >= 0 or final:  # a whole block that does not start the usual way: parse it whole
            block = self.buf[:end] if end >= 0 else self.buf
            self.buf = self.buf[end + len(CLOSE):] if end >= 0 else ""
            self.state, self.after_call = "text", True
            call = json_call(self.plan, block)
            if call is not None:
                self.whole_call(events, *call)
            elif end >= 0:  # an unfinished block at the end is a call cut short: dropped
                self.content(events, OPEN + block + CLOSE)

    def _args(self, events: list[Event], final: bool) -> None:
        end = self.scan.end(self.buf)
        piece, self.buf = (self.buf, "") if end < 0 else (self.buf[:end], self.buf[end:])
        self.arguments(events, piece)
        if end >= 0:
            self.state = "tail"

    def _tail(self, events: list[Event], final: bool) -> None:
        end = self.buf.find(CLOSE)
        if end >= 0:
            self.buf, self.state, self.after_call = self.buf[end + len(CLOSE):], "text", True
        elif final:
            self.buf, self.state = "", "text"


def forced(plan: ToolPlan) -> dict:
    tags = [json_tag(OPEN + '\n{"name": ' + json.dumps(name) + ', "arguments": ', schema, "}\n" + CLOSE)
            for name, schema in plan.forced_functions()]
    return tags_format(tags, "\n", plan.single)


def calls_text(calls: list[dict[str, str]], dialect: str) -> str:
    return "\n".join(f'{OPEN}\n{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"]}}}\n{CLOSE}'
                     for c in calls)


def result_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


FORMAT = ToolFormat("hermes", lambda template: OPEN in template, HermesParser, forced, PROMPT, calls_text,
                    result_text)
