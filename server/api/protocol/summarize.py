"""POST /v1/summarize: one document or several, summarized (map-reduce past the context window)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body, Usage


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
