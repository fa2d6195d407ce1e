"""POST /v1/responses (OpenAI's Responses API): the request's input items, tools and text format, and the response
object with its output items. Field names follow the `openai` package's own types, so its client parses them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, StrictBool, Tag, field_validator, model_validator

from server.api.protocol.chat import FunctionDef
from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body
from server.api.protocol.sampling import PRIORITY_MAX, PRIORITY_MIN

ItemStatus = Literal["in_progress", "completed", "incomplete"]
TEXT_PARTS = ("input_text", "output_text")


# -- input --------------------------------------------------------------------------------------------------------
class InputTextPart(Body):
    type: Literal["input_text", "output_text"]
    text: str


def text_parts_only(value: Any) -> Any:
    """One clear refusal for a part that is not text (images, files), instead of one error per union branch."""
    for j, part in enumerate(value if isinstance(value, list) else []):
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        if kind not in TEXT_PARTS:
            raise ValueError(f"content part {j} is of type {kind!r}; only input_text and output_text are supported")
    return value


class InputMessage(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart]
    id: str | None = None
    status: ItemStatus | None = None

    _text_only = field_validator("content", mode="before")(text_parts_only)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(..., description="the arguments, as JSON text")
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]
    id: str | None = None
    status: ItemStatus | None = None

    _text_only = field_validator("output", mode="before")(text_parts_only)

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(p.text for p in self.output)


class ReasoningItem(Body):
    """A reasoning item sent back as input (clients echo a response's output): accepted, and left out of the
    prompt, as chat templates drop earlier turns' thinking."""
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None


def _item_tag(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if kind in ("message", "function_call", "function_call_output", "reasoning") else "unknown"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_tag, custom_error_type="invalid_item",
                  custom_error_message="input items must be messages, function_call, function_call_output or "
                                       "reasoning items")]


# -- tools and text format ----------------------------------------------------------------------------------------
class FunctionTool(FunctionDef):
    type: Literal["function"] = "function"

    @model_validator(mode="before")
    @classmethod
    def functions_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"tools of type {data.get('type')!r} are not supported; only 'function' tools are")
        return data


class ToolChoiceFunction(Body):
    type: Literal["function"]
    name: str


class TextFormat(Body):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the output must match")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced exactly")

    @model_validator(mode="after")
    def schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a text format of type json_schema needs a schema")
        return self


class TextConfig(Body):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


def _input_may_be_a_string(schema: dict[str, Any]) -> None:
    """`input` is validated as a list (a string becomes one user message first, so that a bad item gets one error
    naming it), but documented as either."""
    items = schema["properties"]["input"]
    schema["properties"]["input"] = {"anyOf": [{"type": "string"}, {k: v for k, v in items.items()
                                                                     if k not in ("title", "description")}],
                                     "title": items.get("title", "Input"), "description": items.get("description")}


class ResponsesRequest(Body):
    model_config = ConfigDict(json_schema_extra=_input_may_be_a_string)
    model: str | None = Field(None, description="the served model's name (see /v1/models); omitted: that model")
    input: list[InputItem] = Field(..., description="a string (one user message), or a list of input items")
    instructions: str | None = Field(None, description="a system message; not carried over by previous_response_id")
    previous_response_id: str | None = Field(None, description="continue from a stored response")
    store: StrictBool = Field(True, description="keep this response for GET and previous_response_id")
    tools: list[FunctionTool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = Field(None, description="the output format: text, json_object or json_schema")
    max_output_tokens: int | None = Field(None, ge=1, description="null: up to the context window")
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = None
    top_k: int | None = Field(None, description="0 or -1 = off")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, description="accepted and echoed")
    stream: StrictBool = False
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="lower runs first when the server is busy")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)

    @field_validator("input", mode="before")
    @classmethod
    def string_is_a_message(cls, value: Any) -> Any:
        return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value

    @field_validator("metadata")
    @classmethod
    def metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 characters, values up to 512")
        return value


# -- output -------------------------------------------------------------------------------------------------------
class OutputText(Body):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []


class OutputMessage(Body):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = []


class OutputFunctionCall(Body):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


class ReasoningText(Body):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class OutputReasoning(Body):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]] = []
    content: list[ReasoningText] = []
    status: ItemStatus = "in_progress"


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]


class InputTokensDetails(Body):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # the newest clients require it; always 0 (no explicit prompt caching here)


class OutputTokensDetails(Body):
    reasoning_tokens: int = 0


class ResponseUsage(Body):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class IncompleteDetails(Body):
    reason: Literal["max_output_tokens"] | None = None


class ResponseError(Body):
    code: str
    message: str


class Response(Body):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    tools: list[FunctionTool] = []
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


class ResponseDeleted(Body):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
