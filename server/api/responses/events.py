"""From generated text to Responses output: items (`reasoning`, `message` with `output_text`, `function_call`) and
the stream events that build them, in the order the `openai` client's stream accumulator expects (item added, part
added, deltas, text done, part done, item done), each with its `sequence_number`. A whole answer goes through the
same builder as a stream, so a streamed response ends exactly as the non-streamed one would."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.answer import AnswerParser
from server.api.errors import APIError
from server.api.protocol.responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from server.api.reasoning import ReasoningSetup
from server.api.tools import Event, ToolPlan
from server.engine import CompletionOutput

Item = OutputMessage | OutputFunctionCall | OutputReasoning


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class OutputBuilder:
    """Output items grown piece by piece; every method returns the stream events of what it did."""
    items: list[Item] = field(default_factory=list)
    sequence: int = 0
    _open: Item | None = None

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": type, "sequence_number": self.sequence - 1, **fields}

    def _where(self) -> dict[str, Any]:
        """The newest item's place (the open item is always the newest)."""
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1}

    def _start(self, item: Item) -> list[dict]:
        events = self._close("completed")
        self.items.append(item)
        self._open = item
        events.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                 item=dump(item)))
        if isinstance(item, (OutputMessage, OutputReasoning)):
            part = OutputText() if isinstance(item, OutputMessage) else ReasoningText()
            item.content.append(part)
            events.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                     part=dump(part)))
        return events

    def apply(self, e: Event) -> list[dict]:
        if e.kind == "call":
            return self._start(OutputFunctionCall(id=item_id("fc"), call_id=e.id, name=e.text))
        if e.kind == "arguments":
            self._open.arguments += e.text
            return [self.event("response.function_call_arguments.delta", **self._where(), delta=e.text)]
        kind = OutputMessage if e.kind == "content" else OutputReasoning
        events = [] if isinstance(self._open, kind) else self._start(kind(id=item_id(
            "msg" if kind is OutputMessage else "rs")))
        self._open.content[0].text += e.text
        delta = "response.output_text.delta" if kind is OutputMessage else "response.reasoning_text.delta"
        logprobs = {"logprobs": []} if kind is OutputMessage else {}
        return events + [self.event(delta, **self._where(), content_index=0, delta=e.text, **logprobs)]

    def _close(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        events = []
        if isinstance(item, OutputFunctionCall):
            events.append(self.event("response.function_call_arguments.done", **self._where(),
                                     arguments=item.arguments, name=item.name))
        else:
            part = item.content[0]
            if isinstance(item, OutputMessage):
                events.append(self.event("response.output_text.done", **self._where(), content_index=0,
                                         text=part.text, logprobs=[]))
            else:
                events.append(self.event("response.reasoning_text.done", **self._where(), content_index=0,
                                         text=part.text))
            events.append(self.event("response.content_part.done", **self._where(), content_index=0,
                                     part=dump(part)))
        item.status = status
        events.append(self.event("response.output_item.done", output_index=len(self.items) - 1, item=dump(item)))
        return events

    def finish(self, status: str) -> list[dict]:
        """Close the open item (`status`: completed, or incomplete when the answer was cut); an answer that made
        no item at all still gets its (empty) message."""
        events = [] if self.items else self._start(OutputMessage(id=item_id("msg")))
        return events + self._close(status)


def dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


def whole_output(text: str, plan: ToolPlan | None, setup: ReasoningSetup | None, status: str) -> list[Item]:
    """The output items of a whole answer."""
    reader, builder = AnswerParser.of(plan, setup), OutputBuilder()
    for e in reader.feed(text) + reader.finish():
        builder.apply(e)
    builder.finish(status)
    return builder.items


def outcome(finish_reason: str | None) -> tuple[str, IncompleteDetails | None]:
    """The response's status and incomplete_details for an engine finish reason."""
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "abort":  # the server's drain ended it
        return "incomplete", IncompleteDetails()
    return "completed", None


@dataclass
class Turn:
    """What a response object repeats from its request, whatever its state."""
    body: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: item_id("resp"))
    created_at: int = 0

    def response(self, status: str, output: list[Item] | None = None, **extra: Any) -> Response:
        b = self.body
        return Response(id=self.id, created_at=self.created_at, status=status, model=self.model, output=output or [],
                        instructions=b.instructions, max_output_tokens=b.max_output_tokens,
                        parallel_tool_calls=b.parallel_tool_calls, previous_response_id=b.previous_response_id,
                        store=b.store, temperature=1.0 if b.temperature is None else b.temperature,
                        top_p=1.0 if b.top_p is None else b.top_p, text=b.text or TextConfig(),
                        tool_choice=b.tool_choice or "auto", tools=b.tools or [],
                        user=b.user, metadata=b.metadata or {}, **extra)

    def finished(self, output: list[Item], c: CompletionOutput) -> Response:
        status, details = outcome(c.finish_reason)
        usage = ResponseUsage(input_tokens=c.num_prompt_tokens, output_tokens=c.num_output_tokens,
                              total_tokens=c.num_prompt_tokens + c.num_output_tokens,
                              input_tokens_details=InputTokensDetails(cached_tokens=c.num_cached_tokens))
        return self.response(status, output, incomplete_details=details, usage=usage)

    def failed(self, output: list[Item], error: APIError) -> Response:
        """The response a stream ends with after a failure; its error code is one of the few the client types
        know (the preceding `error` event carries the exact one)."""
        code = {400: "invalid_prompt", 429: "rate_limit_exceeded"}.get(error.status, "server_error")
        return self.response("failed", output, error=ResponseError(code=code, message=error.message))
