"""From a Responses request to the chat request the chat pipeline already serves (template, tools plan, grammar,
sampling): input items become chat messages, `instructions` a leading system message, function tools chat tools,
`text.format` a `response_format`. Errors raised on the way name the Responses field, not the chat one."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from server.api.errors import APIError
from server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JSONSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from server.api.protocol.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    InputTextPart,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    ReasoningItem,
    ResponsesRequest,
    ToolChoiceFunction,
)
from server.engine import InvalidRequestError

# chat's parameter names (and the engine's) -> the Responses field a client sent
_PARAMS = [(re.compile(p), r) for p, r in (
    (r"^(messages|prompt)(\..*)?$", "input"),
    (r"^tools\.(\d+)\.function\.(.+)$", r"tools.\1.\2"),
    (r"^response_format\.json_schema\.schema(.*)$", r"text.format.schema\1"),
    (r"^response_format(\.json_schema)?$", "text.format"),
    (r"^max_(completion_)?tokens$", "max_output_tokens"),
)]


def responses_param(param: str | None) -> str | None:
    for pattern, replacement in _PARAMS:
        if param is not None and pattern.match(param):
            return pattern.sub(replacement, param)
    return param


@contextlib.contextmanager
def responses_names() -> Iterator[None]:
    """Errors raised inside name the Responses request's fields."""
    try:
        yield
    except (APIError, InvalidRequestError) as exc:
        exc.param = responses_param(exc.param)
        raise


def as_input(item: Any) -> Any:
    """An output item as the input item that carries it into the next turn."""
    if isinstance(item, OutputMessage):
        return InputMessage(role="assistant", content=[InputTextPart(type="output_text", text=p.text)
                                                       for p in item.content], id=item.id)
    if isinstance(item, OutputFunctionCall):
        return FunctionCallItem(type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments,
                                id=item.id)
    if isinstance(item, OutputReasoning):
        return ReasoningItem(type="reasoning", id=item.id)
    return item


def chat_messages(items: list[Any]) -> list[ChatMessage]:
    """Chat messages of input items: function calls join the assistant message before them (one turn may answer
    and call), their outputs become tool messages, reasoning is left out."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, InputMessage):
            messages.append(ChatMessage(role=item.role, content=item.text))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", content=item.text, tool_call_id=item.call_id))
    return messages


def _tool_choice(body: ResponsesRequest) -> str | NamedToolChoice | None:
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        return NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    return choice


def _response_format(body: ResponsesRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if body.tools and (body.tool_choice == "required" or isinstance(body.tool_choice, ToolChoiceFunction)):
        raise APIError(400, "text.format cannot be combined with a tool_choice that forces a function call",
                       param="tool_choice")
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    spec = JSONSchemaSpec(name=fmt.name or "response", description=fmt.description, schema=fmt.schema_,
                          strict=fmt.strict)
    return ResponseFormat(type="json_schema", json_schema=spec)


def to_chat_request(body: ResponsesRequest, items: list[Any]) -> ChatCompletionRequest:
    """The chat request that answers `items` (the whole conversation) under the request's settings."""
    messages = chat_messages(items)
    if not messages:
        raise APIError(400, "input holds no message to answer", param="input")
    if body.instructions and messages[0].role in ("system", "developer"):  # many templates take one system turn
        messages[0] = ChatMessage(role=messages[0].role, content=f"{body.instructions}\n\n{messages[0].content}")
    elif body.instructions:
        messages.insert(0, ChatMessage(role="system", content=body.instructions))
    tools = [Tool(type="function", function=FunctionDef.model_validate(t.model_dump(exclude={"type"})))
             for t in body.tools] if body.tools else None
    return ChatCompletionRequest.model_validate({
        "messages": messages, "tools": tools, "tool_choice": _tool_choice(body),
        "parallel_tool_calls": body.parallel_tool_calls, "response_format": _response_format(body),
        "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "top_k": body.top_k, "seed": body.seed, "priority": body.priority, "timeout": body.timeout,
        "user": body.user})
