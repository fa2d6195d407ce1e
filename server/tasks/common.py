"""What both tasks share: the generate callable's shape and prefill-only scoring."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from server.engine import RequestOutput, SamplingParams, TokenLogprob, TokenUsage, collect

# (prompt_token_ids, params, *, deadline=None) -> the request's deltas, as AsyncEngine.generate; leaving the
# iteration early aborts the request
Generate = Callable[..., AsyncIterator[RequestOutput]]
MAX_IN_FLIGHT = 256  # a task's engine requests in flight at once: enough to batch, not enough to fill the queue


def score_params(start: int = 1) -> SamplingParams:
    """Prefill only: no token is generated, the prompt's own token logprobs come back from token `start` on (the
    engine's prefix cache may serve everything before it, e.g. the shared context of several candidate labels)."""
    return SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=start)


async def score_prompt(generate: Generate, prompt_ids: list[int], usage: TokenUsage, start: int = 1,
                       deadline: float | None = None) -> list[TokenLogprob | None]:
    """Logprob of every prompt token from `start` on given the ones before it (None before), from one prefill-only
    request."""
    result = await collect(generate(prompt_ids, score_params(start), deadline=deadline))
    usage.add(result)
    return result[0].prompt_logprobs or []
