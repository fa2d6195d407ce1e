"""Request and response bodies of the encoder routes: /v1/embeddings (OpenAI's schema), /v1/rerank (the Cohere/Jina
shape as vLLM serves it) and /v1/score (vLLM's)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt

from server.api.protocol.common import TIMEOUT_DESCRIPTION, Body

TRUNCATE_DESCRIPTION = ("keep at most this many tokens of each input (-1: the model's maximum input length); "
                        "without it, an input longer than the model takes is refused (400)")


class EncoderFields(Body):
    model: str | None = Field(None, description="the encoder's name (see /v1/models); omitted: the served one")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description=TRUNCATE_DESCRIPTION)
    timeout: float | None = Field(None, gt=0, description=TIMEOUT_DESCRIPTION)


class EncoderUsage(Body):
    prompt_tokens: int = 0
    total_tokens: int = 0


# -- embeddings -----------------------------------------------------------------------------------------------------
class EmbeddingRequest(EncoderFields):
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        ..., description="a text, a list of texts, token ids, or a list of token-id lists")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, description="only the model's own dimension is supported")
    user: str | None = Field(None, description="accepted and ignored")


class EmbeddingData(Body):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(Body):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EncoderUsage


# -- rerank ---------------------------------------------------------------------------------------------------------
class RerankRequest(EncoderFields):
    query: str
    documents: list[str] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=0, description="best results to return (0 or omitted: all)")
    return_documents: StrictBool = Field(True, description="include each document's text in its result")


class RerankDocument(Body):
    text: str


class RerankResult(Body):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(Body):
    id: str
    model: str
    usage: EncoderUsage
    results: list[RerankResult]


# -- score ----------------------------------------------------------------------------------------------------------
class ScoreRequest(EncoderFields):
    text_1: str | list[str] = Field(..., description="a text (scored against every text_2) or a list (pairwise)")
    text_2: str | list[str]


class ScoreData(Body):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(Body):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: EncoderUsage
