"""POST /v1/summarize: one document or several (summarized concurrently); long ones are map-reduced by the
summarization task. With `stream`, the final summary streams as `summary.chunk` events (`index` says which input)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Settings, Tracker
from server.api.errors import APIError
from server.api.protocol import SummarizeRequest, SummarizeResponse, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.streaming import merge, prime, sse, until_disconnect
from server.engine import TokenUsage, gather_all

router = APIRouter()


@router.post("/v1/summarize", response_model=SummarizeResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Summarize documents (map-reduce over chunks when they are long)")
async def summarize(body: SummarizeRequest, served: ReadyModel, tracker: Tracker, settings: Settings,
                    request: Request):
    served.check_model(body.model)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    s = served.summarizer
    for i, text in enumerate(inputs):  # every input is checked before work starts on any, naming the one at fault
        s.check_input(text, "input" if isinstance(body.input, str) else f"input.{i}")
    request_id, created, deadline = new_id("sum"), now(), tracker.deadline(body.timeout)
    if not body.stream:
        with tracker.task():
            finals = await until_disconnect(request, gather_all(
                s.summarize(text, body.style, body.max_tokens, body.chunk_tokens, deadline) for text in inputs))
        usage = TokenUsage()
        for f in finals:
            usage.merge(f.usage)
        summaries = [f.summary for f in finals]
        return SummarizeResponse(id=request_id, created=created, model=served.name,
                                 summary=summaries[0] if isinstance(body.input, str) else summaries,
                                 usage=Usage.of(usage, cached=False))
    with tracker.task():  # priming sends every engine request the summaries make (the map calls, then the reduce)
        streams = await prime([s.stream(text, body.style, body.max_tokens, body.chunk_tokens, deadline)
                               for text in inputs])

    async def chunks() -> AsyncIterator[dict]:
        base = {"id": request_id, "object": "summary.chunk", "created": created, "model": served.name}
        usage = TokenUsage()
        async for index, event in merge(streams):
            if event.done:
                usage.merge(event.usage)
                yield {**base, "index": index, "delta": "", "finish_reason": "stop"}
            elif event.delta:
                yield {**base, "index": index, "delta": event.delta, "finish_reason": None}
        yield {**base, "object": "summary", "usage": Usage.of(usage, cached=False).model_dump(exclude_none=True)}

    return sse(chunks(), settings.sse_ping_seconds, settings.retry_after)
