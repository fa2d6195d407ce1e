"""POST /v1/completions: text completion of one or more prompts (strings or token ids), streamed or not.

`echo` prepends the prompt; with `logprobs` it also returns the prompt's token logprobs, and with `max_tokens: 0`
nothing is generated at all, which is how clients score a text (perplexity) through the OpenAI API."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api.errors import APIError
from server.api.logprobs import TokenText, completion_logprobs, merge_completion_logprobs
from server.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, new_id, now
from server.api.routes import ERROR_RESPONSES, STREAMING_200
from server.api.sampling import Choice, UsageCounter, build_params, collect, non_empty
from server.api.serving import ReadyServing, Serving
from server.api.streaming import gather_or_cancel, merge, prime, sse, until_disconnect

router = APIRouter()


def prompt_ids(body: CompletionRequest, serving: Serving) -> list[list[int]]:
    """Token ids per prompt (their range is checked by the engine)."""
    p, tok = body.prompt, serving.tokenizer
    if isinstance(p, str):
        return [non_empty(tok.encode(p), "prompt")]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    if all(isinstance(x, str) for x in p):
        return [non_empty(tok.encode(x), f"prompt.{i}") for i, x in enumerate(p)]
    return [non_empty(list(x), f"prompt.{i}") for i, x in enumerate(p)]


class EchoPrefix:
    """The prompt's text (and, with logprobs, its token logprobs) that echo puts in front of a choice."""

    def __init__(self, body: CompletionRequest, ids: list[int], text: TokenText, tokenizer):
        self.body, self.ids, self.token_text = body, ids, text
        self.text = tokenizer.decode(ids, skip_special_tokens=False) if body.echo else ""

    def logprobs(self, prompt_logprobs) -> object | None:
        if not self.body.echo or self.body.logprobs is None or prompt_logprobs is None:
            return None
        return completion_logprobs(self.token_text, prompt_logprobs, self.ids)


def choice_logprobs(body, echo: EchoPrefix, c: Choice, text: TokenText):
    if body.logprobs is None:
        return None
    generated = completion_logprobs(text, c.logprobs, c.token_ids, offset=len(echo.text))
    prefix = echo.logprobs(c.prompt_logprobs)
    return merge_completion_logprobs(prefix, generated) if prefix else generated


@router.post("/v1/completions", response_model=CompletionResponse, responses={**STREAMING_200, **ERROR_RESPONSES},
             summary="Complete prompts (OpenAI completions API)")
async def create_completion(body: CompletionRequest, serving: ReadyServing, request: Request):
    serving.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
    prompts = prompt_ids(body, serving)
    wants_prompt_lp = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    params = build_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                          prompt_logprobs=(body.logprobs or 0) if wants_prompt_lp else None)
    text = TokenText(serving.tokenizer)
    request_id, created, n = new_id("cmpl"), now(), body.n
    streams = [serving.generate(ids, params, "completions", f"{request_id}-{i}", body.priority)
               for i, ids in enumerate(prompts)]

    if not body.stream:
        results = await until_disconnect(request, gather_or_cancel(collect(s, n) for s in streams))
        echoes = [EchoPrefix(body, ids, text, serving.tokenizer) for ids in prompts]  # ids checked by the engine
        usage, choices = UsageCounter(), []
        for p, (echo, seqs) in enumerate(zip(echoes, results)):
            for i, c in enumerate(seqs):
                usage.add(p, c, i)
                choices.append(CompletionChoice(index=p * n + i, text=echo.text + c.text,
                                                logprobs=choice_logprobs(body, echo, c, text),
                                                finish_reason=c.finish_reason))
        return CompletionResponse(id=request_id, created=created, model=serving.model_name, choices=choices,
                                  usage=usage.usage())

    streams = await prime(streams)
    echoes = [EchoPrefix(body, ids, text, serving.tokenizer) for ids in prompts]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[dict]:
        usage, started = UsageCounter(), set()
        base = {"id": request_id, "object": "text_completion", "created": created, "model": serving.model_name}
        async for p, out in merge(streams):
            if out.finish_reason == "error":
                raise APIError(500, out.error or "the engine failed this request", code="engine_error")
            usage.add(p, out, out.index)
            echo, index = echoes[p], p * n + out.index
            c = Choice()
            c.add(out)
            prefix = ""
            lp = completion_logprobs(text, c.logprobs, c.token_ids) if body.logprobs is not None else None
            if index not in started:  # the first chunk of a choice carries the echoed prompt
                started.add(index)
                prefix = echo.text
                echo_lp = echo.logprobs(out.prompt_logprobs)
                if echo_lp is not None:
                    lp = merge_completion_logprobs(echo_lp, lp)
            choice = {"index": index, "text": prefix + out.text,
                      "logprobs": lp.model_dump() if lp is not None else None, "finish_reason": out.finish_reason}
            chunk = {**base, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**base, "choices": [], "usage": usage.usage().model_dump()}

    return sse(chunks(), serving.settings.sse_ping_seconds, serving.settings.retry_after)
