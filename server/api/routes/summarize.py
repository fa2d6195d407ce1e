"""POST /v1/summarize: one document or several (summarized concurrently); long ones are map-reduced by the
summarization task. With `stream`, the final summary streams as `summary.chunk` events (`index` says which input)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.errors import APIError
from server.api.protocol import SummarizeRequest, SummarizeResponse, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.serving import ReadyServing, Serving
from server.api.streaming import gather_or_cancel, merge, prime, sse, until_disconnect
from server.tasks import Summarizer, SummaryEvent, TaskError, TaskUsage

router = APIRouter()


def summarizer(serving: Serving) -> Summarizer:
    s = serving.settings
    return Summarizer(functools.partial(serving.generate, endpoint="summarize"), serving.tokenizer,
                      serving.max_model_len, chunk_tokens=s.summarize_chunk_tokens, max_tokens=s.summarize_max_tokens)


def to_usage(u: TaskUsage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 total_tokens=u.prompt_tokens + u.completion_tokens)


@router.post("/v1/summarize", response_model=SummarizeResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Summarize documents (map-reduce over chunks when they are long)")
async def summarize(body: SummarizeRequest, serving: ReadyServing, request: Request):
    serving.check_model(body.model)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise APIError(400, "input must not be empty", param="input")
    for i, text in enumerate(inputs):
        if not text.strip():
            raise APIError(400, "input must not be empty", param="input" if isinstance(body.input, str) else f"input.{i}")
    s = summarizer(serving)
    request_id, created = new_id("sum"), now()
    streams = [s.stream(text, body.style, body.max_tokens, body.chunk_tokens) for text in inputs]
    try:
        if not body.stream:
            finals = await until_disconnect(request, gather_or_cancel(_last(st) for st in streams))
            usage = TaskUsage()
            for f in finals:
                usage.merge(f.usage)
            summaries = [f.summary for f in finals]
            return SummarizeResponse(id=request_id, created=created, model=serving.model_name,
                                     summary=summaries[0] if isinstance(body.input, str) else summaries,
                                     usage=to_usage(usage))
        streams = await prime(streams)
    except TaskError as exc:
        raise APIError(500, str(exc), code="engine_error") from exc

    async def chunks() -> AsyncIterator[dict]:
        base = {"id": request_id, "object": "summary.chunk", "created": created, "model": serving.model_name}
        usage = TaskUsage()
        async for index, event in merge(streams):
            if event.done:
                usage.merge(event.usage)
                yield {**base, "index": index, "delta": "", "finish_reason": "stop"}
            elif event.delta:
                yield {**base, "index": index, "delta": event.delta, "finish_reason": None}
        yield {**base, "object": "summary", "usage": to_usage(usage).model_dump(exclude_none=True)}

    return sse(chunks(), serving.settings.sse_ping_seconds, serving.settings.retry_after)


async def _last(stream: AsyncIterator[SummaryEvent]) -> SummaryEvent:
    last = None
    async with contextlib.aclosing(stream):
        async for event in stream:
            last = event
    return last
