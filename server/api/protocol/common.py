"""What every body shares: the base model (unknown fields ignored, text must be valid Unicode), ids and timestamps,
token usage, and OpenAI's error shape."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, model_validator

from server.engine import CompletionOutput, TokenUsage


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


class StreamOptions(Body):
    include_usage: StrictBool = False


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

    @classmethod
    def of_requests(cls, requests: Iterable[list[CompletionOutput]]) -> Usage:
        """The usage of engine requests, each given by its n completions (which share one prompt)."""
        usage = TokenUsage()
        for completions in requests:
            usage.add(completions)
        return cls.of(usage)


class ErrorDetail(Body):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Body):
    error: ErrorDetail
