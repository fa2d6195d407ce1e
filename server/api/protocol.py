"""Request and response bodies (pydantic), following OpenAI's schema where one exists.

Numeric ranges of sampling parameters are checked once, by the engine's `SamplingParams`, whose errors name the
offending field; the models here check shapes and types. Unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from server.engine import TokenUsage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def _check_unicode(value: Any) -> None:
    """JSON may carry lone surrogates ("\\ud800"); they are not text and no tokenizer takes them."""
    if isinstance(value, str):
        if not value.isascii():
            value.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k)
            _check_unicode(v)
    elif isinstance(value, list):
        for v in value:
            if not isinstance(v, int):
                _check_unicode(v)


TIMEOUT_DESCRIPTION = ("seconds this request may take, queue time included (default: the server's --request-timeout); "
                       "past it the request is aborted: 504 `request_timeout`, or an SSE error event then [DONE]")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        try:
            _check_unicode(data)
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode text (no lone surrogates)") from None
        return data


# -- shared ---------------------------------------------------------------------------------------------------------
class StreamOptions(Body):
    include_usage: StrictBool = False


class SamplingFields(Body):
    """What completions and chat share: the engine's sampling parameters, OpenAI names."""
    model: str | None = Field(None, description="the served model's name (see /v1/models); omitted: that model")
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = None
    top_k: int | None = Field(None, description="0 or -1 = off")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = Field(1, description="completions per prompt")
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: str | None = Field(None, description="accepted and ignored")
    priority: int = Field(0, description="lower runs first when the server is busy")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class JSONSchemaSpec(Body):
    name: str = Field("response", description="a name for the schema (OpenAI requires one)")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the output must match")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced exactly")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class StructuredOutputs(Body):
    """vLLM's `structured_outputs` extra: exactly one of these constrains the output."""
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema (object or JSON text)")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="an EBNF (GBNF-style) grammar with a `root` rule")
    json_object: bool | None = None


class StructuredFields(SamplingFields):
    response_format: ResponseFormat | None = Field(
        None, description="`text`, `json_object`, or `json_schema` (enforced while decoding)")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's extra: one of `json`, `regex`, `choice`, `grammar`")


class Usage(Body):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None

    @classmethod
    def of(cls, usage: TokenUsage, cached: bool = True) -> Usage:
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details={"cached_tokens": usage.cached_tokens} if cached else None)


class ErrorDetail(Body):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Body):
    error: ErrorDetail


# -- completions ----------------------------------------------------------------------------------------------------
class CompletionRequest(StructuredFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(16, description="null: up to the context window")
    echo: StrictBool = Field(False, description="prepend the prompt to the text (and its logprobs, with `logprobs`)")
    logprobs: int | None = Field(None, description="logprobs of the sampled token and this many alternatives")
    best_of: int | None = Field(None, description="only best_of == n is supported")
    suffix: str | None = Field(None, description="not supported")


class CompletionLogprobs(Body):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# -- chat -----------------------------------------------------------------------------------------------------------
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
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments")
    strict: bool | None = None


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


# -- models ---------------------------------------------------------------------------------------------------------
class ModelCard(Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loom"
    max_model_len: int | None = None
    capabilities: list[str] | None = Field(None, description="the routes this model serves")


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- summarize ------------------------------------------------------------------------------------------------------
class SummarizeRequest(Body):
    model: str | None = None
    input: str | list[str] = Field(..., description="a document, or several summarized concurrently")
    max_tokens: int | None = Field(None, ge=1, description="length of each summary (default: server setting)")
    style: Literal["paragraph", "bullets"] = "paragraph"
    stream: StrictBool = False
    chunk_tokens: int | None = Field(None, ge=64, description="largest piece summarized in one call (map-reduce)")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class SummarizeResponse(Body):
    id: str
    object: Literal["summary"] = "summary"
    created: int
    model: str
    summary: str | list[str]
    usage: Usage


# -- classify -------------------------------------------------------------------------------------------------------
class ClassifyExample(Body):
    text: str
    label: str


class ClassifyRequest(Body):
    model: str | None = None
    input: str | list[str] = Field(..., description="a text, or several classified in one batch")
    labels: list[str] | None = Field(None, min_length=1, max_length=64,
                                     description="candidate labels (zero-shot: required; with a fine-tuned classifier: "
                                                 "optional, a subset of the model's labels)")
    multi_label: StrictBool = Field(False, description="score each label independently (yes/no) instead of one of them")
    label_descriptions: dict[str, str] | None = Field(None, description="label -> what it means")
    examples: list[ClassifyExample] | None = Field(None, max_length=32, description="few-shot examples")
    calibrate: StrictBool = Field(True, description="divide out the model's bias toward labels on a content-free input")
    permutations: int | None = Field(None, ge=1, le=8, description="label orders averaged (default: server setting)")
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class ClassifyResult(Body):
    index: int
    label: str
    scores: dict[str, float]
    labels: list[str] | None = Field(None, description="multi_label: every label scored at least 0.5")


class ClassifyResponse(Body):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[ClassifyResult]
    usage: Usage


# -- tokenize (vLLM's shapes) ---------------------------------------------------------------------------------------
class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = Field(None, description="text to tokenize (or `messages`)")
    messages: list[ChatMessage] | None = Field(None, description="a conversation, rendered with the chat template")
    add_special_tokens: StrictBool = Field(True, description="for `prompt`: add the tokenizer's special tokens (BOS...)")
    add_generation_prompt: StrictBool = Field(True, description="for `messages`: end with the assistant's turn opening")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(Body):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[StrictInt] = Field(..., description="token ids")


class DetokenizeResponse(Body):
    prompt: str


class VersionResponse(Body):
    version: str


class StatusResponse(Body):
    """What the playground's status strip shows: the model and the engine's load, right now."""
    ready: bool
    reason: str | None = Field(None, description="why not ready (loading, warming up, draining, engine stopped)")
    model: str | None = None
    embedding_model: str | None = Field(None, description="the encoder serving /v1/embeddings and /v1/rerank, if any")
    max_model_len: int | None = None
    running: int = Field(0, description="sequences in the running batch")
    waiting: int = Field(0, description="sequences waiting to be scheduled")
    kv_cache_usage: float = Field(0.0, description="fraction of KV-cache blocks in use (0..1)")
    kv_cache_blocks: int = 0
    block_size: int | None = None
    prompt_tokens: int = Field(0, description="prompt tokens processed since start")
    generation_tokens: int = Field(0, description="tokens generated since start")
