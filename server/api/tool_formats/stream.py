"""The machinery of the streaming tool-call parsers: a state machine fed text pieces, the calls it has found, content
that is held back while it may still start a call, and a scanner that finds where a JSON (or Python) value ends.

A parser's state `s` is handled by its method `_s(events, final)`, which consumes from `buf`, emits events and may
change the state; `feed` runs handlers while they make progress, `finish` runs them with `final=True` (no more text
comes: partial markers are decided) until the buffer is empty. Because whole answers go through the same parser,
a stream reassembles to exactly the whole answer's parse whatever its pieces."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.api.protocol import FunctionCall, ToolCall
from server.api.tool_formats.base import Event, ToolPlan, new_call_id


def held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of one of `markers` (and might become it)."""
    return max((k for m in markers for k in range(min(len(m) - 1, len(text)), 0, -1) if text.endswith(m[:k])),
               default=0)


def json_piece(text: str) -> str:
    """`text` as the inside of a JSON string: escaping is per character, so pieces concatenate to the whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@dataclass
class ValueScan:
    """Finds the end of a JSON value that starts with `{` or `[` (or of a Python list, with `quotes` "'\"" and
    parentheses among the brackets), fed in pieces: string contents and escapes are skipped, brackets counted."""
    quotes: str = '"'
    opens: str = "{["
    closes: str = "}]"
    depth: int = 0
    quote: str = ""  # the open string's quote
    escape: bool = False

    def end(self, text: str) -> int:
        """Index just past the value's end in `text`, or -1 when it goes on beyond it."""
        for i, ch in enumerate(text):
            if self.quote:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == self.quote:
                    self.quote = ""
            elif ch in self.quotes:
                self.quote = ch
            elif ch in self.opens:
                self.depth += 1
            elif ch in self.closes:
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


@dataclass
class StreamParser:
    plan: ToolPlan
    state: str = "text"
    buf: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    started: bool = False  # any content emitted yet
    after_call: bool = False  # the next content follows a call (its leading whitespace goes)
    pending: str = ""  # text of a call being read, given back as content if it turns out not to be one
    scan: ValueScan = field(default_factory=ValueScan)  # where the value being read ends

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(events, final=False)
            if (self.state, len(self.buf)) == before:
                return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(events, final=True)
            if (self.state, len(self.buf)) == before or (self.state == before[0] and not self.buf):
                return events

    # -- shared steps -------------------------------------------------------------------------------------------------
    def content(self, events: list[Event], text: str) -> None:
        if not self.started or self.after_call:  # no whitespace at the start, nor glued to a call
            text = text.lstrip()
        if text:
            self.started, self.after_call = True, False
            events.append(Event("content", text))

    def text_until(self, events: list[Event], final: bool, markers: tuple[str, ...]) -> tuple[str, int] | None:
        """Emit content up to the first of `markers` and return (marker, its end in `buf`); None when there is none
        yet: the text that may still start one (and trailing whitespace, which a call may follow) is held back."""
        hits = [(at, m) for m in markers if (at := self.buf.find(m)) >= 0]
        if hits:
            at, marker = min(hits)
            self.content(events, self.buf[:at].rstrip())
            return marker, at + len(marker)
        keep = 0 if final else held(self.buf, markers)
        ready = self.buf[:len(self.buf) - keep].rstrip()
        self.content(events, ready)
        self.buf = "" if final else self.buf[len(ready):]
        return None

    def not_a_call(self, events: list[Event]) -> None:
        """What was read as the start of a call is text after all: it goes out as content, reading goes on."""
        self.content(events, self.pending)
        self.pending, self.state = "", "text"

    def start_call(self, events: list[Event], name: str) -> None:
        call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=""))
        self.calls.append(call)
        self.pending = ""
        events.append(Event("call", name, len(self.calls) - 1, call.id))

    def arguments(self, events: list[Event], piece: str) -> None:
        if piece:
            self.calls[-1].function.arguments += piece
            events.append(Event("arguments", piece, len(self.calls) - 1))

    def whole_call(self, events: list[Event], name: str, arguments: str) -> None:
        self.start_call(events, name)
        self.arguments(events, arguments)
