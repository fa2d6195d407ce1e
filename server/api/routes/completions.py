"""POST /v1/completions: text completion of one or more prompts (strings or token ids), streamed or not.

`echo` prepends the prompt; with `logprobs` it also returns the prompt's token logprobs, and with `max_tokens: 0`
nothing is generated at all, which is how clients score a text (perplexity) through the OpenAI API."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.deps import ReadyModel, Settings, Tracker
from server.api.errors import APIError
from server.api.logprobs import TokenText, completion_logprobs, merge_completion_logprobs
from server.api.params import build_params, check_text_length
from server.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage, new_id, now
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.streaming import ChunkEnvelope, merge, prime, sse, until_disconnect
from server.api.structured import compile_request_grammar
from server.engine import CompletionOutput, InvalidRequestError, RequestOutput, collect, gather_all
from server.model import Tokenizer

router = APIRouter()


def prompt_ids(body: CompletionRequest, tokenizer: Tokenizer, max_model_len: int) -> list[list[int]]:
    """Token ids per prompt (the engine checks that each is non-empty and in the vocabulary). CPU work: called off
    the event loop. A text that cannot fit the context window is refused before it is tokenized."""
    p = body.prompt
    texts = [p] if isinstance(p, str) else [x for x in p or [] if isinstance(x, str)]
    for i, text in enumerate(texts):
        check_text_length(len(text), max_model_len, "prompt" if isinstance(p, str) else f"prompt.{i}")
    if isinstance(p, str):
        return [tokenizer.encode(p)]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]


async def for_prompt(stream: AsyncIterator[RequestOutput], index: int, of: int) -> AsyncIterator[RequestOutput]:
    """The stream of prompt `index` of a batch; the engine's refusal of that prompt names it (`prompt.1`)."""
    try:
        async for out in stream:
            yield out
    except InvalidRequestError as exc:
        if exc.param != "prompt" or of == 1:
            raise
        raise InvalidRequestError(str(exc), f"prompt.{index}", exc.code) from exc
    finally:
        await stream.aclose()


class EchoPrefix:
    """The prompt's text (and, with logprobs, its token logprobs) that echo puts in front of a choice."""

    def __init__(self, body: CompletionRequest, ids: list[int], text: TokenText, tokenizer):
        self.body, self.ids, self.token_text = body, ids, text
        self.text = tokenizer.decode(ids, skip_special_tokens=False) if body.echo else ""

    def logprobs(self, prompt_logprobs) -> object | None:
        if not self.body.echo or self.body.logprobs is None or prompt_logprobs is None:
            return None
        return completion_logprobs(self.token_text, prompt_logprobs, self.ids)


def choice_logprobs(body, echo: EchoPrefix, c: CompletionOutput, text: TokenText):
    if body.logprobs is None:
        return None
    generated = completion_logprobs(text, c.logprobs, c.token_ids, offset=len(echo.text))
    prefix = echo.logprobs(c.prompt_logprobs)
    return merge_completion_logprobs(prefix, generated) if prefix else generated


def check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")


def completion_response(body: CompletionRequest, base: dict, echoes: list[EchoPrefix],
                        results: list[list[CompletionOutput]], text: TokenText) -> CompletionResponse:
    """Every prompt's n choices, numbered prompt by prompt."""
    choices = [CompletionChoice(index=p * body.n + c.index, text=echo.text + c.text,
                                logprobs=choice_logprobs(body, echo, c, text), finish_reason=c.finish_reason)
               for p, (echo, completions) in enumerate(zip(echoes, results)) for c in completions]
    return CompletionResponse(**base, choices=choices, usage=Usage.of_requests(results))


async def completion_chunks(body: CompletionRequest, streams: list[AsyncIterator[RequestOutput]],
                            echoes: list[EchoPrefix], envelope: ChunkEnvelope, text: TokenText) -> AsyncIterator[dict]:
    """The prompts' streams merged as deltas arrive; the first chunk of each choice carries its echoed prompt."""
    completions = [[CompletionOutput(index=i) for i in range(body.n)] for _ in echoes]
    started: set[int] = set()
    async for p, out in merge(streams):
        index = p * body.n + out.index
        completions[p][out.index].add(out)
        lp = completion_logprobs(text, out.logprobs, out.token_ids) if body.logprobs is not None else None
        prefix = ""
        if index not in started:
            started.add(index)
            prefix = echoes[p].text
            echo_lp = echoes[p].logprobs(out.prompt_logprobs)
            if echo_lp is not None:
                lp = merge_completion_logprobs(echo_lp, lp)
        yield envelope.chunk({"index": index, "text": prefix + out.text,
                              "logprobs": lp.model_dump() if lp is not None else None,
                              "finish_reason": out.finish_reason})
    for usage in envelope.usage_chunks(completions):
        yield usage


@router.post("/v1/completions", response_model=CompletionResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Complete prompts (OpenAI completions API)")
async def create_completion(body: CompletionRequest, served: ReadyModel, tracker: Tracker, settings: Settings,
                            request: Request):
    adapter = served.resolve_model(body.model)
    check_supported(body)
    grammar = await compile_request_grammar(body, served.engine)
    prompts = await asyncio.to_thread(prompt_ids, body, served.tokenizer, served.max_model_len)
    wants_prompt_lp = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    params = build_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs, grammar=grammar,
                          prompt_logprobs=(body.logprobs or 0) if wants_prompt_lp else None)
    params.lora = adapter
    text = TokenText(served.tokenizer)
    request_id, created, deadline = new_id("cmpl"), now(), tracker.deadline(body.timeout)
    streams = [for_prompt(tracker.generate(ids, params, "completions", f"{request_id}-{i}", body.priority, deadline),
                          i, len(prompts)) for i, ids in enumerate(prompts)]
    if not body.stream:
        results = await until_disconnect(request, gather_all(collect(s, body.n) for s in streams))
        echoes = [EchoPrefix(body, ids, text, served.tokenizer) for ids in prompts]  # ids checked by the engine
        base = {"id": request_id, "created": created, "model": served.answered_by(params)}
        return completion_response(body, base, echoes, results, text)
    streams = await prime(streams)
    echoes = [EchoPrefix(body, ids, text, served.tokenizer) for ids in prompts]
    envelope = ChunkEnvelope(body, id=request_id, object="text_completion", created=created,
                             model=served.answered_by(params))
    return sse(completion_chunks(body, streams, echoes, envelope, text), settings.sse_ping_seconds,
               settings.retry_after)
