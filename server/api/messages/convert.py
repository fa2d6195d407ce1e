"""A Messages request as the internal chat request (so it takes the chat pipeline: template, tools, grammar,
sampling), and an answer back as Anthropic content blocks, stop reason and usage.

Conversation. `system` becomes a system message; a user turn's `tool_result` blocks become tool messages (in their
order, around its text); an assistant turn's `tool_use` blocks become its tool calls; earlier thinking is dropped (chat
templates drop it too). Images and documents are refused: the model reads text only. A final assistant turn
(prefill) is refused rather than answered as a new turn.

Stops. Stop sequences come back inside the text (`include_stop_str_in_output`), so the one that ended the answer is
known: it is cut off here and reported as `stop_sequence`."""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from server.api.answer import Answer
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ToolCall
from server.api.protocol.anthropic import (
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    MessagesUsage,
    ResponseTextBlock,
    ResponseThinkingBlock,
    ResponseToolUseBlock,
    StopReason,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from server.engine import CompletionOutput, RequestOutput

TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# the chat request's field names (and the engine's) -> the Messages field a client sent; chat's message indices are
# not the request's (system prompt, tool results), so those name the whole list
_PARAMS = [(re.compile(p), r) for p, r in (
    (r"^(messages|prompt)(\..*)?$", "messages"),
    (r"^tools\.(\d+)\.function\.parameters(.*)$", r"tools.\1.input_schema\2"),
    (r"^tools\.(\d+)\.function\.(.+)$", r"tools.\1.\2"),
    (r"^response_format\.json_schema\.schema(.*)$", r"output_config.format.schema\1"),
    (r"^response_format(\.json_schema)?$", "output_config.format"),
    (r"^max_(completion_)?tokens$", "max_tokens"),
    (r"^stop$", "stop_sequences"),
    (r"^chat_template_kwargs(\..*)?$", "thinking"),
)]


def messages_param(param: str | None) -> str | None:
    """The Messages request's name for a chat request's (or the engine's) field."""
    for pattern, replacement in _PARAMS:
        if param is not None and pattern.match(param):
            return pattern.sub(replacement, param)
    return param


def _refuse_unreadable(block: Any, where: str) -> None:
    if isinstance(block, (ImageBlock, DocumentBlock)):
        raise APIError(400, f"{where}: {block.type} content blocks are not supported: this server's model reads text "
                            "only")


def _tool_result(block: ToolResultBlock, where: str) -> dict:
    content = block.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            _refuse_unreadable(part, f"{where}.content.{j}")
        content = "\n".join(part.text for part in content)
    content = content or ""
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": f"Error: {content}" if block.is_error
            else content}


def _user_turn(blocks: list, where: str) -> list[dict]:
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(blocks):
        _refuse_unreadable(block, f"{where}.{j}")
        if isinstance(block, ToolResultBlock):
            if text:
                out.append({"role": "user", "content": "\n".join(text)})
                text = []
            out.append(_tool_result(block, f"{where}.{j}"))
        elif isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            raise APIError(400, f"{where}.{j}: tool_use blocks belong in assistant turns")
    return out + ([{"role": "user", "content": "\n".join(text)}] if text else [])


def _assistant_turn(blocks: list, where: str) -> dict:
    text, calls = [], []
    for j, block in enumerate(blocks):
        _refuse_unreadable(block, f"{where}.{j}")
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            raise APIError(400, f"{where}.{j}: tool_result blocks belong in user turns")
    return {"role": "assistant", "content": "\n".join(text) or None, **({"tool_calls": calls} if calls else {})}


def chat_messages(body: CountTokensRequest) -> list[dict]:
    """The conversation as chat messages."""
    out: list[dict] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            out += _user_turn(m.content, f"messages.{i}.content")
        else:
            out.append(_assistant_turn(m.content, f"messages.{i}.content"))
    if body.messages[-1].role == "assistant":
        raise APIError(400, "the last message is an assistant turn: continuing it (prefill) is not supported; end "
                            "with a user turn", param="messages")
    return out


def _tool_fields(body: CountTokensRequest) -> dict:
    tools = []
    for i, t in enumerate(body.tools or []):
        if t.type not in (None, "custom") or t.input_schema is None:
            raise APIError(400, f"tools.{i}: only custom tools (name, description, input_schema) are supported"
                                + (f", not {t.type!r}" if t.type not in (None, "custom") else ""))
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": t.input_schema}})
    fields: dict[str, Any] = {"tools": tools or None}
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = TOOL_CHOICES.get(choice.type) or {"type": "function", "function": {"name": choice.name}}
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def _sampling_fields(body: MessagesRequest) -> dict:
    fields: dict[str, Any] = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                              "top_k": body.top_k, "priority": body.priority, "timeout": body.timeout}
    if body.stop_sequences:
        fields.update(stop=body.stop_sequences, include_stop_str_in_output=True)
    return fields


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request a Messages request amounts to (count_tokens bodies give its prompt half)."""
    fields: dict[str, Any] = {"model": body.model, "messages": chat_messages(body), **_tool_fields(body)}
    if body.thinking is not None and body.thinking.type != "adaptive":
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    if body.output_config is not None and body.output_config.format is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": body.output_config.format.schema_}}
    if isinstance(body, MessagesRequest):
        fields.update(_sampling_fields(body))
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, first["msg"], param=".".join(map(str, first["loc"]))) from None


def cut_stop_sequence(text: str, c: CompletionOutput | RequestOutput,
                      stops: list[str] | None) -> tuple[str, str | None]:
    """The answer's text without the stop sequence that ended it, and that sequence (None: none did)."""
    if c.finish_reason == "stop" and stops:
        for stop in sorted(stops, key=len, reverse=True):
            if text.endswith(stop):
                return text[:len(text) - len(stop)], stop
    return text, None


def stop_reason(finish: str | None, calls: list, stop_sequence: str | None) -> StopReason:
    if finish == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_use_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_")


def tool_input(arguments: str) -> dict:
    """A call's arguments as its `input` (an answer cut off inside them gives what could be read: nothing)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(a: Answer) -> list[ResponseThinkingBlock | ResponseTextBlock | ResponseToolUseBlock]:
    blocks: list = [ResponseThinkingBlock(thinking=a.reasoning)] if a.reasoning else []
    if a.content:
        blocks.append(ResponseTextBlock(text=a.content))
    return blocks + [ResponseToolUseBlock(id=tool_use_id(c), name=c.function.name,
                                          input=tool_input(c.function.arguments)) for c in a.calls]


def usage(c: CompletionOutput | RequestOutput, output_tokens: int | None = None) -> MessagesUsage:
    """Anthropic counts prompt tokens read from the cache apart from the others."""
    return MessagesUsage(input_tokens=c.num_prompt_tokens - c.num_cached_tokens,
                         output_tokens=c.num_output_tokens if output_tokens is None else output_tokens,
                         cache_read_input_tokens=c.num_cached_tokens)
