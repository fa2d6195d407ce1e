"""POST /v1/chat/completions (OpenAI's schema): messages, tools, and the answer."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, StrictBool, field_validator

from server.api.protocol.common import Body, Usage
from server.api.protocol.sampling import StructuredFields


class ContentPart(Body):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(Body):
    name: str
    arguments: str = Field(..., description="the arguments, as JSON text")


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages: the calls it made")
    tool_call_id: str | None = Field(None, description="tool messages: the call this answers")


class FunctionDef(Body):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments (an object)")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def arguments_are_an_object(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        """Arguments are a JSON object (as OpenAI requires): a string or enum schema would let a call's arguments run
        past its closing tag."""
        if schema and (schema.get("type", "object") != "object" or {"enum", "const"} & schema.keys()):
            raise ValueError("must be a JSON Schema of type object (a function's arguments are a JSON object)")
        return schema


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(StructuredFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, description="null: up to the context window")
    max_completion_tokens: int | None = Field(None, description="preferred alias of max_tokens")
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, description="alternatives per token, with logprobs: true")
    tools: list[Tool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default `auto` with tools; `required` and a named function are enforced by grammar")
    parallel_tool_calls: StrictBool = Field(True, description="false: at most one call per answer")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="variables for the model's chat template, e.g. {\"enable_thinking\": false} for Qwen3")


class TopLogprob(Body):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Body):
    content: list[TokenLogprobEntry] | None = None


class ChatResponseMessage(Body):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(None, description="the thinking, split out by --reasoning-parser")
    reasoning: str | None = Field(None, description="the same text as reasoning_content (its newer name)")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Body):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
