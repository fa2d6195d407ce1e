"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, answered by the chat pipeline (the
request is translated into a chat request, server/api/messages/convert.py) and in Anthropic's shapes: content blocks,
stop reasons, usage, the streamed event sequence, and errors."""
from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from server.api.answer import AnswerParser, parse_answer
from server.api.deps import ReadyModel, Settings, Tracker
from server.api.messages.convert import chat_request, content_blocks, cut_stop_sequence, stop_reason, usage
from server.api.messages.errors import AnthropicRoute
from server.api.messages.events import anthropic_sse, message_events
from server.api.params import check_text_length
from server.api.protocol.anthropic import (
    AnthropicErrorResponse,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    MessagesResponse,
)
from server.api.routes.chat import answer_reasoning, message_chars, prepare, render_messages
from server.api.streaming import prime, until_disconnect
from server.api.tools import check_tool_messages, plan_tools
from server.engine import collect

router = APIRouter(route_class=AnthropicRoute)

ANTHROPIC_ERRORS = {status: {"model": AnthropicErrorResponse, "description": description} for status, description in {
    400: "invalid_request_error: malformed JSON, schema violation, unsupported content, a parameter out of range",
    401: "authentication_error: missing or wrong API key (`x-api-key` or `Authorization: Bearer`)",
    404: "not_found_error: unknown model",
    429: "rate_limit_error: the waiting queue is full; see Retry-After",
    500: "api_error: internal error",
    503: "overloaded_error: the model is loading, the engine stopped, or the server is draining",
    504: "timeout_error: the request's timeout passed",
}.items()}
STREAMING = {200: {"description": "the message, or with `stream: true` server-sent events (`event: <type>` and "
                                  "`data: {event}`, from message_start to message_stop)",
                   "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/v1/messages", response_model=MessagesResponse, responses={**STREAMING, **ANTHROPIC_ERRORS},
             summary="Answer a conversation (Anthropic Messages API)")
async def create_message(body: MessagesRequest, served: ReadyModel, tracker: Tracker, settings: Settings,
                         request: Request):
    chat = chat_request(body)
    ids, params, plan = await prepare(chat, served, settings.reasoning_parser)
    setup = answer_reasoning(settings.reasoning_parser, served, ids, chat)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    stream = tracker.generate(ids, params, "messages", message_id, body.priority, tracker.deadline(body.timeout))
    frame = {"id": message_id, "type": "message", "role": "assistant", "model": served.answered_by(params)}
    if not body.stream:
        (c,) = await until_disconnect(request, collect(stream))
        text, stop = cut_stop_sequence(c.text, c, body.stop_sequences)
        answer = parse_answer(text, plan, setup)
        return MessagesResponse(**frame, content=content_blocks(answer), stop_sequence=stop, usage=usage(c),
                                stop_reason=stop_reason(c.finish_reason, answer.calls, stop))
    (stream,) = await prime([stream])
    events = message_events(stream, AnswerParser.of(plan, setup), frame, body.stop_sequences)
    return anthropic_sse(events, settings.sse_ping_seconds, settings.retry_after)


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse, responses=ANTHROPIC_ERRORS,
             summary="Count the prompt tokens of a Messages request")
async def count_message_tokens(body: CountTokensRequest, served: ReadyModel) -> CountTokensResponse:
    chat = chat_request(body)
    served.resolve_model(chat.model)
    check_tool_messages(chat.messages)
    check_text_length(message_chars(chat.messages), served.max_model_len, "messages")
    plan = plan_tools(chat, getattr(served.tokenizer.hf, "chat_template", None), served.tool_call_parser)
    # CPU work: off the event loop
    ids = await asyncio.to_thread(render_messages, chat.messages, served.tokenizer, True, plan,
                                  chat.chat_template_kwargs)
    return CountTokensResponse(input_tokens=len(ids))
