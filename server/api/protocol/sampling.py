"""What completions and chat share: the engine's sampling parameters under OpenAI's names, scheduling (priority,
timeout), and structured output (OpenAI's `response_format`, vLLM's `structured_outputs`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt

from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body, StreamOptions

# The engine orders waiting requests by arrival time + priority * seconds, in floating point: an unbounded integer
# would overflow there. A signed 32-bit range is far more levels than any deployment uses.
PRIORITY_MIN, PRIORITY_MAX = -(2 ** 31), 2 ** 31 - 1


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
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="lower runs first when the server is busy")
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
