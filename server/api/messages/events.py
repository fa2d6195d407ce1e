"""The streamed Messages answer, in the event sequence Anthropic's clients expect: `message_start` (usage so far),
then each content block as `content_block_start`, its deltas (`thinking_delta`, `text_delta`, `input_json_delta`)
and `content_block_stop`, one `ping` after the first block opens, then `message_delta` (stop reason, stop sequence,
usage) and `message_stop`. Each SSE event carries its type twice, as the `event:` name and in the data, as
Anthropic's do; an error after the headers went out is an `error` event."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse

from server.api.answer import AnswerParser
from server.api.messages.convert import cut_stop_sequence, stop_reason, tool_use_id, usage
from server.api.messages.errors import anthropic_error, anthropic_error_body
from server.api.tools import Event
from server.engine import CompletionOutput, RequestOutput

BLOCK_KINDS = {"reasoning": "thinking", "content": "text", "call": "tool_use", "arguments": "tool_use"}


@dataclass
class BlockWriter:
    """Turns answer events into content-block events: a block opens when the kind of text changes, or per call."""
    parser: AnswerParser
    index: int = -1
    kind: str | None = None  # the open block's type
    started: bool = False  # message_start went out
    pinged: bool = False
    events: list[dict] = field(default_factory=list)

    def write(self, event: Event) -> None:
        kind = BLOCK_KINDS[event.kind]
        if event.kind == "call" or kind != self.kind:
            self.close()
            self.index, self.kind = self.index + 1, kind
            self.events.append({"type": "content_block_start", "index": self.index,
                                "content_block": self._start(event, kind)})
            if not self.pinged:
                self.pinged = True
                self.events.append({"type": "ping"})
            if event.kind == "call":
                return
        delta = {"thinking": {"type": "thinking_delta", "thinking": event.text},
                 "text": {"type": "text_delta", "text": event.text},
                 "tool_use": {"type": "input_json_delta", "partial_json": event.text}}[kind]
        self.events.append({"type": "content_block_delta", "index": self.index, "delta": delta})

    def _start(self, event: Event, kind: str) -> dict:
        if kind == "thinking":
            return {"type": "thinking", "thinking": "", "signature": ""}
        if kind == "text":
            return {"type": "text", "text": ""}
        return {"type": "tool_use", "id": tool_use_id(self.parser.calls[event.index]), "name": event.text,
                "input": {}}

    def close(self) -> None:
        if self.kind is not None:
            self.events.append({"type": "content_block_stop", "index": self.index})
            self.kind = None

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events


async def message_events(stream: AsyncIterator[RequestOutput], parser: AnswerParser, message: dict,
                         stops: list[str] | None) -> AsyncIterator[dict]:
    """The events of one streamed answer; `message` is the response's frame (id, model...) without content."""
    writer, done = BlockWriter(parser), CompletionOutput()
    async with contextlib.aclosing(stream):
        async for out in stream:
            if not writer.started:
                writer.started = True
                yield {"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                                            "stop_sequence": None,
                                                            "usage": usage(out, output_tokens=0).model_dump()}}
            text, stop = cut_stop_sequence(out.text, out, stops)
            done.add(out)
            for event in parser.feed(text) + (parser.finish() if out.finished else []):
                writer.write(event)
            if out.finished:
                writer.close()
                if not writer.pinged:
                    writer.events.append({"type": "ping"})
                writer.events += [{"type": "message_delta", "delta": {
                    "stop_reason": stop_reason(out.finish_reason, parser.calls, stop), "stop_sequence": stop},
                    "usage": usage(done).model_dump()}, {"type": "message_stop"}]
            for event in writer.take():
                yield event


def anthropic_sse(events: AsyncIterator[dict], ping: float = 15.0, retry_after: int = 1) -> EventSourceResponse:
    """`event: <type>` + `data: {json}` per event; an error mid-stream is sent as an `error` event."""

    async def frames() -> AsyncIterator[dict]:
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False,
                                                                      separators=(",", ":"))}
            except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band, as Anthropic does
                err = anthropic_error(exc, retry_after)
                yield {"event": "error", "data": json.dumps(anthropic_error_body(err.status, err.message))}

    return EventSourceResponse(frames(), ping=ping, sep="\n", headers={"Cache-Control": "no-cache"})
