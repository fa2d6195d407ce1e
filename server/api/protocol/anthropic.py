"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages schema): content blocks, tools, the answer,
and Anthropic's error shape. Unknown fields are ignored (cache_control, citations, service_tier...); blocks this
server cannot read (images, documents) parse here and are refused with a 400 naming them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body
from server.api.protocol.sampling import PRIORITY_MAX, PRIORITY_MIN

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(Body):
    type: Literal["text"]
    text: str


class ImageBlock(Body):
    type: Literal["image"]
    source: dict[str, Any] | None = None


class DocumentBlock(Body):
    type: Literal["document"]
    source: dict[str, Any] | None = None


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]] | None = None
    is_error: StrictBool = False


class ThinkingBlock(Body):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Body):
    type: Literal["redacted_thinking"]
    data: str | None = None


ContentBlock = Annotated[TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock, Field(discriminator="type")]


class MessageParam(Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class MessagesTool(Body):
    """A custom tool. Anthropic's server tools (a `type` such as `web_search_20250305`) parse, and are refused."""
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = Field(None, description="a JSON Schema of the input (an object)")
    type: str | None = Field(None, description="`custom` or absent")

    @field_validator("input_schema")
    @classmethod
    def input_is_an_object(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and (schema.get("type", "object") != "object" or {"enum", "const"} & schema.keys()):
            raise ValueError("must be a JSON Schema of type object (a tool's input is a JSON object)")
        return schema


class MessagesToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="type `tool`: the tool to call")
    disable_parallel_tool_use: StrictBool = False

    @model_validator(mode="after")
    def tool_has_a_name(self) -> MessagesToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type `tool` needs `name`")
        return self


class ThinkingConfig(Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, description="accepted; the thinking is bounded by max_tokens only")


class OutputFormat(Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(..., alias="schema", description="the JSON Schema the answer must match")


class OutputConfig(Body):
    format: OutputFormat | None = Field(None, description="structured output, enforced while decoding")
    effort: str | None = Field(None, description="accepted and ignored")


class Metadata(Body):
    user_id: str | None = None


class CountTokensRequest(Body):
    """What the prompt is made of: the body of /v1/messages/count_tokens, and the first half of /v1/messages."""
    model: str = Field(..., description="the served model's name (see /v1/models)")
    messages: list[MessageParam] = Field(..., min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[MessagesTool] | None = None
    tool_choice: MessagesToolChoice | None = None
    thinking: ThinkingConfig | None = Field(
        None, description="with a reasoning parser: `enabled` / `disabled` set the template's `enable_thinking`")
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(..., ge=1, description="the most tokens to generate")
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = Field(None, description="accepted and ignored")
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="lower runs first when the server is busy")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class ResponseTextBlock(Body):
    type: Literal["text"] = "text"
    text: str


class ResponseThinkingBlock(Body):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = Field("", description="empty: the thinking is the server's own, nothing to verify")


class ResponseToolUseBlock(Body):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessagesUsage(Body):
    input_tokens: int = Field(..., description="prompt tokens not read from the prefix cache")
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = Field(0, description="prompt tokens served by the prefix cache")


class MessagesResponse(Body):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseThinkingBlock | ResponseTextBlock | ResponseToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessagesUsage


class CountTokensResponse(Body):
    input_tokens: int


class AnthropicErrorDetail(Body):
    type: str
    message: str


class AnthropicErrorResponse(Body):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
