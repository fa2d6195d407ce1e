"""POST /tokenize and POST /detokenize (vLLM's shapes). Tokenizing runs on a worker thread, so a long
text never blocks the event loop."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.api.deps import ReadyModel
from server.api.errors import APIError
from server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.routes import ERROR_RESPONSES
from server.api.routes.chat import render_messages

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             summary="Token ids of a text, or of a conversation in the chat template")
async def tokenize(body: TokenizeRequest, served: ReadyModel) -> TokenizeResponse:
    served.resolve_model(body.model)  # adapters share the tokenizer
    tok = served.tokenizer
    if body.messages is not None:
        ids = await asyncio.to_thread(render_messages, body.messages, tok, body.add_generation_prompt, None,
                                      body.chat_template_kwargs)
    else:
        ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=served.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             summary="The text of token ids")
async def detokenize(body: DetokenizeRequest, served: ReadyModel) -> DetokenizeResponse:
    served.resolve_model(body.model)  # adapters share the tokenizer
    vocab = served.engine.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token ids must be in [0, {vocab})", param=f"tokens.{bad}")
    text = await asyncio.to_thread(served.tokenizer.decode, body.tokens, False)
    return DetokenizeResponse(prompt=text)
