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
from server.api.structured import compile_request_grammar
from server.api.tools import (
    Event,
    ToolCallParser,
    ToolPlan,
    forced_spec,
    parse_tool_calls,
    plan_tools,
    template_messages,
)
from server.engine import CompletionOutput, TokenUsage, collect
from server.model import Tokenizer

router = APIRouter()


def render_messages(chat: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                    plan: ToolPlan | None = None) -> list[int]:
    """Token ids of the conversation in the model's own chat template (text content parts only), with the tools
    of `plan` rendered by the template itself or in a system prompt (server/api/tools.py)."""
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
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, "only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    messages = template_messages(messages, plan)
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt, plan.tools if plan and plan.native else None)
    except Exception as exc:  # the template refused these messages (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc


def check_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def tool_delta(event: Event) -> dict:
    """One streamed piece of an answer with tools, in OpenAI's delta shape."""
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "call":
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.text, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def answer(c: CompletionOutput, plan: ToolPlan | None) -> tuple[ChatResponseMessage, str | None]:
    if plan is None:
        return ChatResponseMessage(content=c.text), c.finish_reason
    content, calls = parse_tool_calls(plan, c.text)
    return ChatResponseMessage(content=content, tool_calls=calls or None), finish_reason(c.finish_reason, calls)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Answer a conversation (OpenAI chat completions API)")
async def create_chat_completion(body: ChatCompletionRequest, served: ReadyModel, tracker: Tracker,
                                 settings: Settings, request: Request):
    served.check_model(body.model)
    check_unsupported(body)
    chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(part.text or "") for part in m.content)
                for m in body.messages if m.content)
    check_text_length(chars, served.max_model_len, "messages")
    plan = plan_tools(body, getattr(served.tokenizer.hf, "chat_template", None))
    grammar = await compile_request_grammar(body, served.engine)
    if plan is not None and plan.forced:
        if grammar is not None:
            raise APIError(400, "response_format / structured_outputs cannot be combined with tool_choice "
                                f"{body.tool_choice if isinstance(body.tool_choice, str) else 'naming a function'}",
                           param="tool_choice")
        grammar = await served.engine.compile_grammar(forced_spec(plan), "tool_choice")
    # CPU work: off the event loop
    ids = await asyncio.to_thread(render_messages, body.messages, served.tokenizer, True, plan)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = build_params(body, max_tokens=max_tokens, grammar=grammar,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    text = TokenText(served.tokenizer)
    request_id, created, n = new_id("chatcmpl"), now(), body.n
    stream = tracker.generate(ids, params, "chat", request_id, body.priority, tracker.deadline(body.timeout))

    if not body.stream:
        completions = await until_disconnect(request, collect(stream, n))
        choices = [ChatChoice(index=c.index, message=message, finish_reason=reason,
                              logprobs=chat_logprobs(text, c.logprobs, c.token_ids) if body.logprobs else None)
                   for c in completions for message, reason in [answer(c, plan)]]
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
        parsers = [ToolCallParser(plan) for _ in range(n)] if plan is not None else None
        async for _, out in merge([stream]):
            completions[out.index].add(out)
            lp = chat_logprobs(text, out.logprobs, out.token_ids).model_dump() \
                if body.logprobs and out.token_ids else None
            if parsers is None:
                if out.text or lp:
                    yield chunk(out.index, {"content": out.text}, logprobs=lp)
            else:  # tool calls are parsed out of the text as it comes
                parser = parsers[out.index]
                events = parser.feed(out.text) + (parser.finish() if out.finished else [])
                for k, event in enumerate(events):
                    yield chunk(out.index, tool_delta(event), logprobs=lp if k == 0 else None)
                if lp and not events:
                    yield chunk(out.index, {"content": ""}, logprobs=lp)
            if out.finished:
                calls = parsers[out.index].calls if parsers is not None else []
                yield chunk(out.index, {}, finish_reason(out.finish_reason, calls))
        if include_usage:
            yield {**base, "choices": [], "usage": Usage.of(TokenUsage().add(completions)).model_dump()}

    return sse(chunks(), settings.sse_ping_seconds, settings.retry_after)
