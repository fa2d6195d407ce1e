"""One generated answer taken apart: its reasoning (with a reasoning parser on), its content and its tool calls (with
tools in play), whole or as the text streams in. Chat, Messages and Responses all read answers through this, so each
API's stream reassembles to exactly its whole answer.

Events are the tool parser's (`content`, `call`, `arguments`) plus `reasoning` pieces, which come first: tools are
looked for only in the text after the thinking."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.api.protocol import ToolCall
from server.api.reasoning import ReasoningParser, ReasoningSetup
from server.api.tools import Event, ToolCallParser, ToolPlan, parse_tool_calls


@dataclass
class AnswerParser:
    """Feed the answer's text deltas, get events; `finish` once the answer is complete."""
    tools: ToolCallParser | None = None
    reasoning: ReasoningParser | None = None

    @classmethod
    def of(cls, plan: ToolPlan | None, setup: ReasoningSetup | None) -> AnswerParser:
        return cls(ToolCallParser(plan) if plan is not None else None, setup.parser() if setup is not None else None)

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools is not None else []

    def feed(self, text: str) -> list[Event]:
        return self._events(*(self.reasoning.feed(text) if self.reasoning is not None else ("", text)), final=False)

    def finish(self) -> list[Event]:
        return self._events(*(self.reasoning.finish() if self.reasoning is not None else ("", "")), final=True)

    def _events(self, reasoning: str, content: str, final: bool) -> list[Event]:
        events = [Event("reasoning", reasoning)] if reasoning else []
        if self.tools is None:
            return events + ([Event("content", content)] if content else [])
        return events + self.tools.feed(content) + (self.tools.finish() if final else [])


@dataclass
class Answer:
    """A whole answer, taken apart. `content` is None when there is none besides reasoning or tool calls."""
    content: str | None
    reasoning: str | None = None
    calls: list[ToolCall] = field(default_factory=list)


def parse_answer(text: str, plan: ToolPlan | None, setup: ReasoningSetup | None) -> Answer:
    reasoning, rest = setup.split(text) if setup is not None else ("", text)
    if plan is not None:
        content, calls = parse_tool_calls(plan, rest)
        return Answer(content, reasoning or None, calls)
    return Answer(rest if setup is None else rest or None, reasoning or None)
