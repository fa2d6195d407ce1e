"""Awaiting engine requests from asyncio code: fold one request's deltas into its completions, and run many
awaitables at once, cancelling the rest (and so aborting their engine requests) as soon as one fails."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable

from server.engine.outputs import CompletionOutput, RequestOutput


async def collect(stream: AsyncIterator[RequestOutput], n: int = 1) -> list[CompletionOutput]:
    """Drain one request's stream into its n completions; the engine's errors raise through."""
    completions = [CompletionOutput(index=i) for i in range(n)]
    async with contextlib.aclosing(stream):
        async for out in stream:
            completions[out.index].add(out)
    return completions


async def gather_all(awaitables: Iterable[Awaitable], limit: int | None = None) -> list:
    """asyncio.gather, at most `limit` at a time (so a big job does not fill the engine's waiting queue), that
    cancels the others as soon as one fails."""
    semaphore = asyncio.Semaphore(limit) if limit else None

    async def limited(a: Awaitable):
        try:
            if semaphore is None:
                return await a
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
