"""Pythonic calls (Llama 3.2 1B/3B, Llama 4): an answer that starts with a Python list of calls,
`[get_weather(city="Oslo"), f(x=1)]` (Llama 4 may wrap it in `<|python_start|>`...`<|python_end|>`).

The list is parsed with Python's `ast` once its closing bracket arrives: every item must be a call of a known
function with keyword arguments whose values are literals (`ast.literal_eval`: strings, numbers, True/False/None,
lists, tuples, dicts) that JSON can hold; anything else and the whole answer is content. So calls go out whole, each
call's arguments as one piece, when the list closes. Functions whose names are not Python identifiers cannot be
called this way. Text that cannot start such a list goes out as soon as that is clear."""
from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass

from server.api.tool_formats.base import Event
from server.api.tool_formats.format import ToolFormat
from server.api.tool_formats.pythonic_grammar import forced, literal
from server.api.tool_formats.stream import StreamParser, ValueScan

START, END = "<|python_start|>", "<|python_end|>"
PROMPT = """You can call functions. These are the functions available, as JSON schemas:

{tools}

To call functions, answer with only a Python list of the calls, in the format \
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]. Do not use variables. \
Otherwise answer the user directly."""
# what a list of calls begins with: `[`, a name, `(` (a prefix of it may still grow into one)
_BEGIN = re.compile(r"\[\s*(?:([A-Za-z_]\w*)\s*(\()?)?")


def parse_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in the Python list `text`; None unless it is exactly such a list."""
    try:
        with warnings.catch_warnings():  # invalid escapes in string literals warn
            warnings.simplefilter("ignore")
            tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for call in tree.body.elts:
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in names
                and not call.args and all(k.arg is not None for k in call.keywords)):
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            calls.append((call.func.id, json.dumps(args, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return calls


@dataclass
class PythonicParser(StreamParser):
    scan_at: int = 0  # how much of `buf` the scanner has read

    def _text(self, events: list[Event], final: bool) -> None:
        s = self.buf.lstrip()
        if s.startswith(START):
            self.pending += self.buf[:len(self.buf) - len(s) + len(START)]
            self.buf = s[len(START):]
        elif s.startswith("["):
            self.buf, self.state, self.scan, self.scan_at = s, "list", ValueScan("'\"", "{[(", "}])"), 0
        elif final or not START.startswith(s):
            self.not_a_call(events)
            self.state = "plain"

    def _list(self, events: list[Event], final: bool) -> None:
        begin = _BEGIN.match(self.buf)
        if begin.group(2) is None:  # not yet `[name(`: wait while it may become that
            if final or begin.end() < len(self.buf):
                self._give_back(events)
            return
        if begin.group(1) not in self.plan.names:
            self._give_back(events)
            return
        end = self.scan.end(self.buf[self.scan_at:])
        if end < 0:
            self.scan_at = len(self.buf)
            if final:  # a call cut short: dropped
                self.pending, self.buf, self.state = "", "", "plain"
            return
        calls = parse_calls(self.buf[:self.scan_at + end], self.plan.names)
        if calls is None:
            self._give_back(events)
            return
        for call in calls:
            self.whole_call(events, *call)
        self.buf, self.state, self.after_call = self.buf[self.scan_at + end:], "after", True

    def _after(self, events: list[Event], final: bool) -> None:
        s = self.buf.lstrip()
        if s.startswith(END):
            self.buf, self.state = s[len(END):], "plain"
        elif final or not END.startswith(s):
            self.state = "plain"

    def _plain(self, events: list[Event], final: bool) -> None:
        ready = self.buf if final else self.buf.rstrip()  # trailing whitespace waits: the answer may end there
        self.content(events, ready.rstrip())
        self.buf = self.buf[len(ready):]

    def _give_back(self, events: list[Event]) -> None:
        self.pending, self.buf = self.pending + self.buf, ""
        self.not_a_call(events)
        self.state = "plain"


def calls_text(calls: list[dict[str, str]], dialect: str) -> str:
    def call(c: dict[str, str]) -> str:
        try:
            args = json.loads(c["arguments"])
        except json.JSONDecodeError:
            args = {}
        items = args.items() if isinstance(args, dict) else ()
        return f"{c['name']}({', '.join(f'{k}={literal(v)}' for k, v in items)})"

    return "[" + ", ".join(call(c) for c in calls) + "]"


FORMAT = ToolFormat("pythonic", lambda template: "[func_name1(" in template, PythonicParser, forced, PROMPT,
                    calls_text, lambda content: content)
