"""What both tasks share: the generate callable's shape, token usage, concurrent fan-out, prefill-only scoring."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from server.engine import RequestOutput, SamplingParams
from server.engine.sequence import TokenLogprob

# (prompt_token_ids, params) -> the request's deltas; leaving the iteration early aborts it
Generate = Callable[[list[int], SamplingParams], AsyncIterator[RequestOutput]]


def score_params(start: int = 1) -> SamplingParams:
    """Prefill only: no token is generated, the prompt's own token logprobs come back from token `start` on (the
    engine's prefix cache may serve everything before it, e.g. the shared context of several candidate labels)."""
    return SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=start)


class TaskError(RuntimeError):
    """The engine failed a request a task depends on."""


@dataclass
class TaskUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens += out.num_prompt_tokens
        self.completion_tokens += out.num_output_tokens
        self.requests += 1

    def merge(self, other: TaskUsage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests


async def gather_all(awaitables: Iterable[Awaitable], limit: int = 256) -> list:
    """Run concurrently (so the engine batches them), at most `limit` at a time (so a big job does not fill the
    engine's waiting queue); if one fails the others are cancelled, which aborts their engine requests."""
    semaphore = asyncio.Semaphore(limit)

    async def limited(a: Awaitable):
        try:
            async with semaphore:
                return await a
        finally:
            if asyncio.iscoroutine(a):
                a.close()  # cancelled before it started: no "never awaited" warning

    tasks = [asyncio.ensure_future(limited(a)) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def final_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The last delta of a single-sequence request, with the text of all of them (prompt logprobs kept)."""
    text, prompt_logprobs, last = [], None, None
    async with contextlib.aclosing(stream):
        async for out in stream:
            text.append(out.text)
            prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
            last = out
    if last is None or last.finish_reason == "error":
        raise TaskError(last.error if last is not None and last.error else "the engine returned nothing")
    last.text, last.prompt_logprobs = "".join(text), prompt_logprobs
    return last


async def score_prompt(generate: Generate, prompt_ids: list[int], usage: TaskUsage,
                       start: int = 1) -> list[TokenLogprob | None]:
    """Logprob of every prompt token from `start` on given the ones before it (None before), from one prefill-only
    request."""
    out = await final_output(generate(prompt_ids, score_params(start)))
    usage.add(out)
    return out.prompt_logprobs or []
