"""POST /v1/embeddings (OpenAI's schema) on the encoder served beside the generator (`--embedding-model`). Inputs of
every client are batched together on the engine thread (server/engine/encoder.py)."""
from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Tracker
from server.api.encoding import pick_encoder, token_inputs
from server.api.errors import APIError
from server.api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EncoderUsage
from server.api.routes import ERROR_RESPONSES
from server.api.streaming import until_disconnect

router = APIRouter()


def as_base64(row: list[float]) -> str:
    """Little-endian float32 bytes, base64 (what OpenAI's clients decode)."""
    return base64.b64encode(struct.pack(f"<{len(row)}f", *row)).decode("ascii")


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES,
             summary="Embed texts or token ids with the served encoder")
async def embeddings(body: EmbeddingRequest, served: ReadyModel, tracker: Tracker,
                     request: Request) -> EmbeddingResponse:
    enc = pick_encoder(served, body.model, "embed")
    if body.dimensions is not None and body.dimensions != enc.dim:
        raise APIError(400, f"the model {enc.name!r} does not support `dimensions` other than its own ({enc.dim})",
                       param="dimensions")
    inputs = await token_inputs(enc, body.input, body.truncate_prompt_tokens)
    rows = await until_disconnect(request, tracker.encode(enc.name, inputs, "embeddings",
                                                          tracker.deadline(body.timeout)))
    encode = as_base64 if body.encoding_format == "base64" else (lambda row: row)
    tokens = sum(map(len, inputs))
    return EmbeddingResponse(data=[EmbeddingData(index=i, embedding=encode(row)) for i, row in enumerate(rows)],
                             model=enc.name, usage=EncoderUsage(prompt_tokens=tokens, total_tokens=tokens))
