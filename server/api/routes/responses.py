"""POST /v1/responses (OpenAI's Responses API), answered or streamed as typed events, and GET / DELETE of the
responses the server keeps. A request is translated into a chat request and served by the chat pipeline (template,
tools, grammar, sampling); its output is rebuilt as Responses items."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.api.answer import AnswerParser
from server.api.deps import ReadyModel, Settings, Tracker
from server.api.errors import APIError, from_engine_error
from server.api.lifecycle import ServedModel
from server.api.protocol import now
from server.api.protocol.responses import Response, ResponseDeleted, ResponsesRequest
from server.api.reasoning import ReasoningSetup
from server.api.responses.convert import as_input, responses_names, to_chat_request
from server.api.responses.events import Item, OutputBuilder, Turn, dump, outcome, whole_output
from server.api.responses.store import ResponseStore, StoredResponse
from server.api.routes import ERROR_RESPONSES
from server.api.routes.chat import answer_reasoning, prepare
from server.api.settings import ServerSettings
from server.api.streaming import prime, until_disconnect
from server.api.tools import ToolPlan
from server.engine import CompletionOutput, RequestOutput, SamplingParams, collect

router = APIRouter()
STORE_OFF = "responses are not stored on this server (--responses-store-max-entries 0)"
EVENTS_200 = {200: {"description": "the response object, or with `stream: true` server-sent events (`event: <type>` "
                                   "and `data: {event}` with its `sequence_number`), ending with response.completed, "
                                   "response.incomplete or response.failed",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def response_store(request: Request) -> ResponseStore:
    """The app's store, made on first use from its settings (the app factory need not know it)."""
    state = request.app.state
    if getattr(state, "response_store", None) is None:
        settings: ServerSettings = state.settings
        state.response_store = ResponseStore(settings.responses_store_max_entries, settings.responses_store_max_age)
    return state.response_store


Store = Annotated[ResponseStore, Depends(response_store)]


def earlier_turns(body: ResponsesRequest, store: ResponseStore) -> list[Any]:
    """The conversation `previous_response_id` continues (none without one)."""
    if body.previous_response_id is None:
        return []
    if not store.enabled:
        raise APIError(400, f"previous_response_id cannot be used: {STORE_OFF}", param="previous_response_id")
    entry = store.get(body.previous_response_id)
    if entry is None:
        raise APIError(404, f"no stored response with id {body.previous_response_id!r} (never stored, deleted, or "
                            "expired)", param="previous_response_id", code="previous_response_not_found")
    return entry.conversation


def stored(store: ResponseStore, response_id: str) -> StoredResponse:
    entry = store.get(response_id) if store.enabled else None
    if entry is None:
        reason = "never stored, deleted, or expired" if store.enabled else STORE_OFF
        raise APIError(404, f"no stored response with id {response_id!r} ({reason})", param="response_id",
                       code="response_not_found")
    return entry


def remember(store: ResponseStore, conversation: list[Any], response: Response, output: list[Item]) -> None:
    if response.store:
        store.put(response.id, StoredResponse(response, conversation + [as_input(i) for i in output]))


async def response_events(turn: Turn, stream: AsyncIterator[RequestOutput], parser: AnswerParser,
                          done: Callable[[Response, list[Item]], None], retry_after: int) -> AsyncIterator[dict]:
    """The streamed response: lifecycle events around the output items' own; a failure after the first byte
    becomes an `error` event and response.failed."""
    builder, c = OutputBuilder(), CompletionOutput()
    for kind in ("response.created", "response.in_progress"):
        yield builder.event(kind, response=dump(turn.response("in_progress")))
    try:
        async with contextlib.aclosing(stream):
            async for out in stream:
                c.add(out)
                for e in parser.feed(out.text) + (parser.finish() if out.finished else []):
                    for event in builder.apply(e):
                        yield event
        for event in builder.finish(outcome(c.finish_reason)[0]):
            yield event
        response = turn.finished(builder.items, c)
        done(response, builder.items)
        yield builder.event(f"response.{response.status}", response=dump(response))
    except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band
        err = from_engine_error(exc, retry_after)
        yield builder.event("error", code=err.code, message=err.message, param=err.param)
        yield builder.event("response.failed", response=dump(turn.failed(builder.items, err)))


def event_stream(events: AsyncIterator[dict], ping: float) -> EventSourceResponse:
    async def sse() -> AsyncIterator[dict]:
        async with contextlib.aclosing(events):
            async for event in events:
                yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}

    return EventSourceResponse(sse(), ping=ping, sep="\n", headers={"Cache-Control": "no-cache"})


async def start(body: ResponsesRequest, served: ServedModel, conversation: list[Any],
                settings: ServerSettings) -> tuple[list[int], SamplingParams, ToolPlan | None, ReasoningSetup | None]:
    """The engine request this asks for: prompt ids, sampling parameters, tools plan and reasoning split."""
    with responses_names():
        adapter = served.resolve_model(body.model)
        chat = to_chat_request(body, conversation)
        ids, params, plan = await prepare(chat, served, settings.reasoning_parser)
        params.lora = adapter  # the chat request it amounts to names no model
    return ids, params, plan, answer_reasoning(settings.reasoning_parser, served, ids, chat)


@router.post("/v1/responses", response_model=Response, responses={**EVENTS_200, **ERROR_RESPONSES},
             summary="Answer input items (OpenAI Responses API)")
async def create_response(body: ResponsesRequest, served: ReadyModel, tracker: Tracker, settings: Settings,
                          store: Store, request: Request):
    conversation = earlier_turns(body, store) + body.input
    ids, params, plan, setup = await start(body, served, conversation, settings)
    turn = Turn(body, served.answered_by(params), created_at=now())
    stream = tracker.generate(ids, params, "responses", turn.id, body.priority, tracker.deadline(body.timeout))

    def done(response: Response, output: list[Item]) -> None:
        remember(store, conversation, response, output)

    if not body.stream:
        with responses_names():
            (c,) = await until_disconnect(request, collect(stream, 1))
        output = whole_output(c.text, plan, setup, outcome(c.finish_reason)[0])
        response = turn.finished(output, c)
        done(response, output)
        return response
    with responses_names():
        (stream,) = await prime([stream])
    events = response_events(turn, stream, AnswerParser.of(plan, setup), done, settings.retry_after)
    return event_stream(events, settings.sse_ping_seconds)


@router.get("/v1/responses/{response_id}", response_model=Response, responses=ERROR_RESPONSES,
            summary="A stored response")
async def get_response(response_id: str, store: Store):
    return stored(store, response_id).response


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERROR_RESPONSES,
               summary="Delete a stored response")
async def delete_response(response_id: str, store: Store):
    stored(store, response_id)
    store.delete(response_id)
    return ResponseDeleted(id=response_id)
