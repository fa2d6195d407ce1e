"""POST /v1/rerank (the Cohere/Jina shape as vLLM serves it) and POST /v1/score (vLLM's: text pairs -> score), both
by the cosine similarity of the served encoder's embeddings."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Tracker
from server.api.encoding import cosine, pick_encoder, token_inputs
from server.api.errors import APIError
from server.api.lifecycle import ServedModel
from server.api.protocol import (
    EncoderUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    new_id,
    now,
)
from server.api.routes import ERROR_RESPONSES
from server.api.streaming import until_disconnect
from server.api.tracking import RequestTracker

router = APIRouter()


async def embed_texts(served: ServedModel, tracker: RequestTracker, request: Request, body, texts: list[str],
                      param: str, endpoint: str) -> tuple[str, dict[str, list[float]], int]:
    """(model name, text -> embedding for each distinct text, tokens)."""
    enc = pick_encoder(served, body.model, "embed")
    distinct = list(dict.fromkeys(texts))
    inputs = await token_inputs(enc, distinct, body.truncate_prompt_tokens, param=param, allow_empty_text=True)
    rows = await until_disconnect(request, tracker.encode(enc.name, inputs, endpoint, tracker.deadline(body.timeout)))
    return enc.name, dict(zip(distinct, rows)), sum(map(len, inputs))


@router.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
             summary="Rank documents by relevance to a query (embedding cosine similarity)")
async def rerank(body: RerankRequest, served: ReadyModel, tracker: Tracker, request: Request) -> RerankResponse:
    name, vectors, tokens = await embed_texts(served, tracker, request, body, [body.query, *body.documents],
                                              "documents", "rerank")
    query = vectors[body.query]
    scored = sorted(((cosine(query, vectors[doc]), i) for i, doc in enumerate(body.documents)),
                    key=lambda pair: (-pair[0], pair[1]))
    top = scored[:body.top_n] if body.top_n else scored
    results = [RerankResult(index=i, relevance_score=score,
                            document=RerankDocument(text=body.documents[i]) if body.return_documents else None)
               for score, i in top]
    return RerankResponse(id=new_id("rerank"), model=name, results=results,
                          usage=EncoderUsage(prompt_tokens=tokens, total_tokens=tokens))


@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
             summary="Score text pairs (embedding cosine similarity)")
async def score(body: ScoreRequest, served: ReadyModel, tracker: Tracker, request: Request) -> ScoreResponse:
    first = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
    second = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
    if not first or not second:
        raise APIError(400, "text_1 and text_2 must not be empty", param="text_1" if not first else "text_2")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise APIError(400, f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or as many "
                            f"as text_2", param="text_2")
    name, vectors, tokens = await embed_texts(served, tracker, request, body, [*first, *second], "text_1", "score")
    data = [ScoreData(index=i, score=cosine(vectors[a], vectors[b])) for i, (a, b) in enumerate(zip(first, second))]
    return ScoreResponse(id=new_id("score"), created=now(), model=name, data=data,
                         usage=EncoderUsage(prompt_tokens=tokens, total_tokens=tokens))
