"""POST /v1/chat/completions: messages rendered with the model's chat template, answered or streamed."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.answer import AnswerParser, parse_answer
from server.api.deps import ReadyModel, Settings, Tracker
from server.api.errors import APIError
from server.api.lifecycle import ServedModel
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
from server.api.reasoning import ReasoningSetup, prompt_tail, reasoning_setup
from server.api.reasoning_grammar import after_thinking
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.streaming import ChunkEnvelope, merge, prime, sse, until_disconnect
from server.api.structured import grammar_spec
from server.api.tools import (
    Event,
    ToolPlan,
    check_tool_messages,
    forced_spec,
    plan_tools,
    special_markers,
    template_messages,
)
from server.engine import CompletionOutput, Grammar, InvalidRequestError, RequestOutput, SamplingParams, collect
from server.model import Tokenizer

router = APIRouter()


def render_messages(chat: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                    plan: ToolPlan | None = None, template_kwargs: dict | None = None) -> list[int]:
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
        return tokenizer.encode_chat(messages, add_generation_prompt, plan.tools if plan and plan.native else None,
                                     template_kwargs)
    except Exception as exc:  # the template refused these messages (e.g. roles out of order)
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc


def check_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def tool_delta(event: Event) -> dict:
    """One streamed piece of an answer with tools, in OpenAI's delta shape."""
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "reasoning":
        return {"reasoning_content": event.text, "reasoning": event.text}
    if event.kind == "call":
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.text, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def answer(c: CompletionOutput, plan: ToolPlan | None,
           setup: ReasoningSetup | None = None) -> tuple[ChatResponseMessage, str | None]:
    a = parse_answer(c.text, plan, setup)
    return (ChatResponseMessage(content=a.content, reasoning_content=a.reasoning, reasoning=a.reasoning,
                                tool_calls=a.calls or None), finish_reason(c.finish_reason, a.calls))


def message_chars(messages: list[ChatMessage]) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else sum(len(part.text or "") for part in m.content)
               for m in messages if m.content)


async def request_grammar(body: ChatCompletionRequest, served: ServedModel, plan: ToolPlan | None,
                          setup: ReasoningSetup | None = None) -> Grammar | None:
    """The grammar the answer must follow: the request's structured output, or the tool call it forces; after a
    free thinking part when the answer starts inside one."""
    found = grammar_spec(body)
    if plan is not None and plan.forced:
        if found is not None:
            raise APIError(400, "response_format / structured_outputs cannot be combined with tool_choice "
                                f"{body.tool_choice if isinstance(body.tool_choice, str) else 'naming a function'}",
                           param="tool_choice")
        found = forced_spec(plan), "tool_choice"
    if found is None:
        return None
    spec, param = found
    if setup is not None and setup.thinking:
        spec = after_thinking(spec, param)
    return await served.engine.compile_grammar(spec, param)


async def prepare(body: ChatCompletionRequest, served: ServedModel,
                  reasoning: str | None = None) -> tuple[list[int], SamplingParams, ToolPlan | None]:
    """Check the request and turn it into the engine request it asks for: prompt ids, sampling parameters, and the
    tools plan its answer is parsed with. `reasoning`: the reasoning parser's format (`answer_reasoning`)."""
    adapter = served.resolve_model(body.model)
    check_unsupported(body)
    check_tool_messages(body.messages)
    check_text_length(message_chars(body.messages), served.max_model_len, "messages")
    plan = plan_tools(body, getattr(served.tokenizer.hf, "chat_template", None), served.tool_call_parser)
    # CPU work: off the event loop
    ids = await asyncio.to_thread(render_messages, body.messages, served.tokenizer, True, plan,
                                  body.chat_template_kwargs)
    grammar = await request_grammar(body, served, plan, answer_reasoning(reasoning, served, ids, body))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = build_params(body, max_tokens=max_tokens, grammar=grammar,
                              logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    except InvalidRequestError as exc:  # name the field the client sent, not the engine's
        exc.param = {"max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
                     "logprobs": "top_logprobs"}.get(exc.param, exc.param)
        raise
    if special_markers(plan):  # the calls' markers are special tokens: the parser must see them
        params.skip_special_tokens = False
    params.lora = adapter
    return ids, params, plan


def answer_reasoning(fmt: str | None, served: ServedModel, ids: list[int],
                     body: ChatCompletionRequest) -> ReasoningSetup | None:
    """How this request's answers are split into reasoning and content (None: no reasoning parser)."""
    return reasoning_setup(fmt, prompt_tail(served.tokenizer, ids), body.chat_template_kwargs) if fmt else None


def chat_response(body: ChatCompletionRequest, base: dict, completions: list[CompletionOutput],
                  plan: ToolPlan | None, text: TokenText,
                  setup: ReasoningSetup | None = None) -> ChatCompletionResponse:
    choices = [ChatChoice(index=c.index, message=message, finish_reason=reason,
                          logprobs=chat_logprobs(text, c.logprobs, c.token_ids) if body.logprobs else None)
               for c in completions for message, reason in [answer(c, plan, setup)]]
    return ChatCompletionResponse(**base, choices=choices, usage=Usage.of_requests([completions]))


async def chat_chunks(body: ChatCompletionRequest, stream: AsyncIterator[RequestOutput], envelope: ChunkEnvelope,
                      plan: ToolPlan | None, text: TokenText,
                      setup: ReasoningSetup | None = None) -> AsyncIterator[dict]:
    """The streamed answer: each choice's role first, then its deltas (reasoning and tool calls parsed out of the
    text as it comes), then its finish reason."""

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        return envelope.chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    completions = [CompletionOutput(index=i) for i in range(body.n)]
    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    parsers = [AnswerParser.of(plan, setup) for _ in range(body.n)] if plan is not None or setup else None
    async for _, out in merge([stream]):
        completions[out.index].add(out)
        lp = chat_logprobs(text, out.logprobs, out.token_ids).model_dump() \
            if body.logprobs and out.token_ids else None
        if parsers is None:
            if out.text or lp:
                yield chunk(out.index, {"content": out.text}, logprobs=lp)
        else:
            parser = parsers[out.index]
            events = parser.feed(out.text) + (parser.finish() if out.finished else [])
            for k, event in enumerate(events):
                yield chunk(out.index, tool_delta(event), logprobs=lp if k == 0 else None)
            if lp and not events:
                yield chunk(out.index, {"content": ""}, logprobs=lp)
        if out.finished:
            calls = parsers[out.index].calls if parsers is not None else []
            yield chunk(out.index, {}, finish_reason(out.finish_reason, calls))
    for usage in envelope.usage_chunks([completions]):
        yield usage


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Answer a conversation (OpenAI chat completions API)")
async def create_chat_completion(body: ChatCompletionRequest, served: ReadyModel, tracker: Tracker,
                                 settings: Settings, request: Request):
    # a client gone while its grammar compiles abandons the compile (server/engine/grammar_compiler.py)
    ids, params, plan = await until_disconnect(request, prepare(body, served, settings.reasoning_parser))
    setup = answer_reasoning(settings.reasoning_parser, served, ids, body)
    text = TokenText(served.tokenizer)
    request_id, created = new_id("chatcmpl"), now()
    stream = tracker.generate(ids, params, "chat", request_id, body.priority, tracker.deadline(body.timeout))
    if not body.stream:
        completions = await until_disconnect(request, collect(stream, body.n))
        base = {"id": request_id, "created": created, "model": served.answered_by(params)}
        return chat_response(body, base, completions, plan, text, setup)
    (stream,) = await prime([stream])
    envelope = ChunkEnvelope(body, id=request_id, object="chat.completion.chunk", created=created,
                             model=served.answered_by(params),
                             system_fingerprint=None)
    return sse(chat_chunks(body, stream, envelope, plan, text, setup), settings.sse_ping_seconds,
               settings.retry_after)
