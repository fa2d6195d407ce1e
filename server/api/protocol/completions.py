"""POST /v1/completions (OpenAI's schema)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt

from server.api.protocol.common import Body, Usage
from server.api.protocol.sampling import StructuredFields


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
