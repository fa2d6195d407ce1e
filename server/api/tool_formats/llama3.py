"""Llama 3.1 JSON calls: an answer that is only `{"name": ..., "parameters": {...}}` (several joined by `;`,
optionally after `<|python_tag|>`). Such an answer is known to be calls only once it is complete, so it is parsed
whole at the end; an answer that does not start with `{` is read as Hermes text (small models mix the two)."""
from __future__ import annotations

import json

from server.api.tool_formats.base import Event, ToolPlan, json_tag, tags_format
from server.api.tool_formats.format import ToolFormat
from server.api.tool_formats.hermes import HermesParser, json_call

PYTHON_TAG = "<|python_tag|>"
PROMPT = """You can call functions. These are the functions available, as JSON schemas:

{tools}

To call a function, answer with only a JSON object in the format {{"name": <function name>, "parameters": <a \
dictionary of argument name and its value>}}. Do not use variables. Otherwise answer the user directly."""


class Llama3Parser(HermesParser):
    def _text(self, events: list[Event], final: bool) -> None:
        if not self.started and not self.calls:
            stripped = self.buf.lstrip()
            if stripped.startswith(("{", PYTHON_TAG)):
                self.state = "llama"
                return
            if not final and PYTHON_TAG.startswith(stripped):  # nothing yet but whitespace, or the tag begun
                return
        super()._text(events, final)

    def _llama(self, events: list[Event], final: bool) -> None:
        if not final:
            return
        text = self.buf.strip().removeprefix(PYTHON_TAG)
        self.buf, self.state = "", "text"
        calls = [json_call(self.plan, p) for p in text.split(";") if p.strip()]
        if not calls or None in calls:
            self.started = True
            events.append(Event("content", text))
            return
        for call in calls:
            self.whole_call(events, *call)


def forced(plan: ToolPlan) -> dict:
    tags = [json_tag('{"name": ' + json.dumps(name) + ', "parameters": ', schema, "}")
            for name, schema in plan.forced_functions()]
    return tags_format(tags, "\n", True)  # the answer is one JSON object


def calls_text(calls: list[dict[str, str]], dialect: str) -> str:
    return "; ".join(f'{{"name": {json.dumps(c["name"])}, "parameters": {c["arguments"]}}}' for c in calls)


def detect(template: str) -> bool:
    return "ipython" in template or PYTHON_TAG in template


FORMAT = ToolFormat("llama3", detect, Llama3Parser, forced, PROMPT, calls_text, lambda content: content)
