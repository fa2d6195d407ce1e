"""The shape of a tool-call format: its template markers, streaming parser, forced-call grammar and the way earlier
calls and results are written into a prompt."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.api.tool_formats.base import Fmt, ToolPlan
from server.api.tool_formats.stream import StreamParser


@dataclass(frozen=True)
class ToolFormat:
    """One tool-call format. `calls_text` writes earlier calls (`[{"name", "arguments": JSON text}]`) as the model
    would have; `result_text` a tool result; `prompt` tells a template that cannot render tools about them (with the
    tools as JSON lines); `forced` is the structural tag (its `format`) that lets the model emit calls only."""
    name: Fmt
    detect: Callable[[str], bool]  # the chat template speaks this format
    parser: Callable[[ToolPlan], StreamParser]
    forced: Callable[[ToolPlan], dict]
    prompt: str  # a `str.format` template of `tools`
    calls_text: Callable[[list[dict[str, str]], str], str]  # (calls, the plan's dialect)
    result_text: Callable[[str], str]
    special_markers: bool = False  # its markers are special tokens, which must not be skipped when detokenizing
    native_id: Callable[[str], str] | None = None  # the call id the native template accepts
