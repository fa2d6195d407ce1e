"""Mistral calls, after the `[TOOL_CALLS]` marker: a JSON list, `[{"name": ..., "arguments": {...}}, ...]`
(tokenizers before v11), or `name[ARGS]{...}` once per call, each after its own `[TOOL_CALLS]` (v11 on; an
optional `[CALL_ID]id` before `[ARGS]` is skipped). Both are read whatever the template; the grammar and the calls
written into prompts follow the template's (`dialect` "args" when it writes `[ARGS]`). Arguments stream as they are
written; a list item whose keys come in another order is parsed whole. The markers are special tokens, kept in the
text while tools are in play. Mistral's templates take only 9-character alphanumeric call ids: ids are mapped to
such ones (the same id always to the same one) when a conversation is rendered."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from server.api.tool_formats.base import Event, ToolPlan, json_tag, tags_format
from server.api.tool_formats.format import ToolFormat
from server.api.tool_formats.hermes import HEAD, json_call
from server.api.tool_formats.stream import StreamParser, ValueScan

CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
PROMPT = """You can call functions. These are the functions available, as JSON schemas:

{tools}

To call functions, answer with only [TOOL_CALLS] followed by a JSON list of the calls, in the format \
[TOOL_CALLS][{{"name": <function name>, "arguments": <the arguments as a JSON object>}}, ...]. \
Otherwise answer the user directly."""
_NAME = re.compile(r"\s*([\w.-]+)\s*(?:\[CALL_ID\]\s*\w*\s*)?(?:\[ARGS\]\s*)?(?=\{)")


@dataclass
class MistralParser(StreamParser):
    listed: bool = False  # the calls are a JSON list

    def _text(self, events: list[Event], final: bool) -> None:
        found = self.text_until(events, final, (CALLS,))
        if found is not None:
            self.pending, self.buf, self.state = CALLS, self.buf[found[1]:], "marker"

    def _marker(self, events: list[Event], final: bool) -> None:
        s = self.buf.lstrip()
        if s.startswith("["):
            self.pending += self.buf[:len(self.buf) - len(s) + 1]
            self.buf, self.state, self.listed = s[1:], "item", True
        elif s:
            self.state, self.listed = "name", False
        elif final:
            self.pending, self.state = "", "text"  # a marker alone at the end: nothing to say

    def _name(self, events: list[Event], final: bool) -> None:
        match = _NAME.match(self.buf)
        if match is not None and match.group(1) in self.plan.names:
            self.start_call(events, match.group(1))
            self.buf, self.state, self.scan = self.buf[match.end():], "args", ValueScan()
        elif match is not None or "{" in self.buf or len(self.buf) > 256:
            self.not_a_call(events)
        elif final:  # a call cut short before its arguments: dropped
            self.pending, self.buf, self.state = "", "", "text"

    def _item(self, events: list[Event], final: bool) -> None:
        """A list item: streamed when it starts the usual way, else parsed whole once it is complete."""
        match = HEAD.match(self.buf)
        if match is not None and (name := json.loads(f'"{match.group(1)}"')) in self.plan.names:
            self.start_call(events, name)
            self.buf, self.state, self.scan = self.buf[match.end():], "args", ValueScan()
            return
        s = self.buf.lstrip()
        end = ValueScan().end(s) if s.startswith("{") else -1
        call = json_call(self.plan, s[:end]) if end > 0 else None
        if call is not None:
            self.whole_call(events, *call)
            self.buf, self.state = s[end:], "next"
        elif end > 0 or final or (s and not s.startswith("{")):
            self.not_a_call(events)

    def _args(self, events: list[Event], final: bool) -> None:
        end = self.scan.end(self.buf)
        piece, self.buf = (self.buf, "") if end < 0 else (self.buf[:end], self.buf[end:])
        self.arguments(events, piece)
        if end >= 0:
            self.state, self.after_call = ("close" if self.listed else "text"), True
        elif final:
            self.state = "text"

    def _close(self, events: list[Event], final: bool) -> None:
        """After a list item's arguments: the item's closing brace."""
        s = self.buf.lstrip()
        if s.startswith("}"):
            self.buf, self.state = s[1:], "next"
        elif s or final:
            self.state = "text"

    def _next(self, events: list[Event], final: bool) -> None:
        """After a list item: another one, or the list's end."""
        s = self.buf.lstrip()
        if s.startswith(","):
            self.buf, self.state = s[1:], "item"
        elif s.startswith("]"):
            self.buf, self.state = s[1:], "text"
        elif s or final:
            self.state = "text"


def forced(plan: ToolPlan) -> dict:
    functions = plan.forced_functions()
    if plan.dialect == "args":
        return tags_format([json_tag(f"{CALLS}{name}{ARGS}", schema, "") for name, schema in functions], "",
                           plan.single)
    tags = [json_tag('{"name": ' + json.dumps(name) + ', "arguments": ', schema, "}") for name, schema in functions]
    return {"type": "sequence", "elements": [{"type": "const_string", "value": CALLS + "["},
                                             tags_format(tags, ", ", plan.single),
                                             {"type": "const_string", "value": "]"}]}


def calls_text(calls: list[dict[str, str]], dialect: str) -> str:
    if dialect == "args":
        return "".join(f"{CALLS}{c['name']}{ARGS}{c['arguments']}" for c in calls)
    return CALLS + "[" + ", ".join(f'{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"]}}}'
                                   for c in calls) + "]"


def native_id(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


FORMAT = ToolFormat("mistral", lambda template: CALLS in template, MistralParser, forced, PROMPT, calls_text,
                    lambda content: f"[TOOL_RESULTS]{content}[/TOOL_RESULTS]", special_markers=True,
                    native_id=native_id)
