"""From request bodies to engine requests (SamplingParams), and from engine deltas back to whole choices and usage."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.api.errors import APIError
from server.api.protocol import SamplingFields, Usage
from server.engine import RequestOutput, SamplingParams
from server.engine.sequence import TokenLogprob


def build_params(body: SamplingFields, *, max_tokens: int | None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams for a completions or chat body; range errors come back as InvalidRequestError (400)."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if isinstance(body.stop, list) and any(not isinstance(s, str) or not s for s in body.stop):
        raise APIError(400, "stop strings must be non-empty", param="stop")
    given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                           "frequency_penalty", "repetition_penalty", "seed")
             if getattr(body, k) is not None}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_tokens=max_tokens, n=body.n, stop=[s for s in stop if s],
                          stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                          include_stop_str_in_output=body.include_stop_str_in_output,
                          skip_special_tokens=body.skip_special_tokens, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, **given)


def non_empty(ids: list[int], param: str = "prompt") -> list[int]:
    if not ids:
        raise APIError(400, "the prompt is empty: it must contain at least one token", param=param)
    return ids


@dataclass
class Choice:
    """One sequence of one prompt, gathered from its deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error


async def collect(stream, n: int) -> list[Choice]:
    """Drain one engine request (n sequences) into its choices; an engine-side error becomes a 500."""
    choices = [Choice() for _ in range(n)]
    async for out in stream:
        choices[out.index].add(out)
    for c in choices:
        if c.finish_reason == "error":
            raise APIError(500, c.error or "the engine failed this request", code="engine_error")
    return choices


class UsageCounter:
    """Usage over several engine requests: prompts counted once per request, outputs per sequence."""

    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion: dict[tuple[int, int], int] = {}

    def add(self, request: int, out: RequestOutput | Choice, index: int = 0) -> None:
        self.prompt[request] = out.num_prompt_tokens
        self.cached[request] = max(self.cached.get(request, 0), out.num_cached_tokens)
        self.completion[(request, index)] = out.num_output_tokens

    def usage(self) -> Usage:
        prompt, completion = sum(self.prompt.values()), sum(self.completion.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details={"cached_tokens": sum(self.cached.values())})
