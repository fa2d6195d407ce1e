"""POST /v1/chat/completions: messages rendered with the model's chat template, answered or streamed."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Settings, Tracker
from server.api.errors import APIError
from server.api.logprobs import TokenText, chat_logprobs
from server.api.params import build_params, check_text_length
from server.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    Usage,
    new_id,
    now,
)
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.streaming import merge, prime, sse, until_disconnect
from server.engine import CompletionOutput, TokenUsage, collect
from server.model import Tokenizer

router = APIRouter()


def render_messages(chat: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation in the model's own chat template (text content parts only)."""
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = []
    for i, m in enumerate(chat):
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content parts of type {part.type!r} are not supported (only 'text')",
                                   param=f"messages.{i}.content.{j}")
                parts.append(part.text)
            content = "\n".join(parts)
        message = {"role": m.role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        messages.append(message)
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt)
    except Exception as exc:  # the template refused these messages (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc


def check_unsupported(body: ChatCompletionRequest) -> None:
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported yet (structured output "
                            f"is not built); use 'text'", param="response_format", code="unsupported_response_format")
    if body.tools:
        raise APIError(400, "tools (function calling) are not supported by this server", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Answer a conversation (OpenAI chat completions API)")
async def create_chat_completion(body: ChatCompletionRequest, served: ReadyModel, tracker: Tracker,
                                 settings: Settings, request: Request):
    served.check_model(body.model)
    check_unsupported(body)
    chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(part.text or "") for part in m.content)
                for m in body.messages if m.content)
    check_text_length(chars, served.max_model_len, "messages")
    ids = await asyncio.to_thread(render_messages, body.messages, served.tokenizer)  # CPU work: off the event loop
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = build_params(body, max_tokens=max_tokens,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    text = TokenText(served.tokenizer)
    request_id, created, n = new_id("chatcmpl"), now(), body.n
    stream = tracker.generate(ids, params, "chat", request_id, body.priority, tracker.deadline(body.timeout))

    if not body.stream:
        completions = await until_disconnect(request, collect(stream, n))
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=chat_logprobs(text, c.logprobs, c.token_ids) if body.logprobs else None,
                              finish_reason=c.finish_reason) for c in completions]
        return ChatCompletionResponse(id=request_id, created=created, model=served.name, choices=choices,
                                      usage=Usage.of(TokenUsage().add(completions)))

    (stream,) = await prime([stream])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
            "system_fingerprint": None}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> dict:
        c = {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason}]}
        if include_usage:
            c["usage"] = None
        return c

    async def chunks() -> AsyncIterator[dict]:
        completions = [CompletionOutput(index=i) for i in range(n)]
        for i in range(n):  # the role comes first, once per choice
            yield chunk(i, {"role": "assistant", "content": ""})
        async for _, out in merge([stream]):
            completions[out.index].add(out)
            if out.text or out.token_ids:
                lp = chat_logprobs(text, out.logprobs, out.token_ids).model_dump() if body.logprobs else None
                if out.text or lp:
                    yield chunk(out.index, {"content": out.text}, logprobs=lp)
            if out.finished:
                yield chunk(out.index, {}, out.finish_reason)
        if include_usage:
            yield {**base, "choices": [], "usage": Usage.of(TokenUsage().add(completions)).model_dump()}

    return sse(chunks(), settings.sse_ping_seconds, settings.retry_after)
