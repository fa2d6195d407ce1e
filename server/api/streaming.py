"""Server-sent events (sse-starlette) and the async-iterator plumbing behind them.

A stream's HTTP status is decided before the first byte: `prime` waits for every engine request's first delta, so a
refused request (context window, queue full, engine down) still answers with a proper error status. After that, a
client that goes away cancels the response task; the cancellation reaches the engine generator, whose cleanup
aborts the request and frees its KV blocks at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable

from sse_starlette import EventSourceResponse

from server.api.errors import ClientGoneError, error_body, from_engine_error
from server.api.protocol import SamplingFields, Usage
from server.engine import CompletionOutput, gather_all

log = logging.getLogger("loom.api")


async def _replay(first, rest: AsyncIterator) -> AsyncIterator:
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item


async def until_disconnect(request, awaitable: Awaitable):
    """Await `awaitable`, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while True:  # the body has been read: the next message is the disconnect (or comes after the response)
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGoneError() from None
        raise
    finally:
        watcher.cancel()


async def prime(streams: list[AsyncIterator]) -> list[AsyncIterator]:
    """Start every stream and wait for its first item; errors raise here, before any response is sent."""
    try:
        firsts = await gather_all(anext(s) for s in streams)
    except BaseException:
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()
        raise
    return [_replay(f, s) for f, s in zip(firsts, streams)]


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(stream number, item) from several streams as items arrive; closing the merge closes them all."""
    if len(streams) == 1:  # the common case: no tasks, cancellation flows straight into the stream
        async with contextlib.aclosing(streams[0]):
            async for item in streams[0]:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


class ChunkEnvelope:
    """What every chunk of one streamed completion repeats (id, object, created, model...), and the usage chunk that
    ends the stream when the request asked for `stream_options.include_usage` (every chunk before it then carries
    `"usage": null`, as OpenAI's do)."""

    def __init__(self, body: SamplingFields, **base):
        self.base = base
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(self, choice: dict) -> dict:
        chunk = {**self.base, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunks(self, requests: Iterable[list[CompletionOutput]]) -> list[dict]:
        """The final usage chunk, if asked for, of engine requests given by their completions."""
        if not self.include_usage:
            return []
        return [{**self.base, "choices": [], "usage": Usage.of_requests(requests).model_dump()}]


def sse(chunks: AsyncIterator[dict], ping: float = 15.0, retry_after: int = 1) -> EventSourceResponse:
    """`data: {json}` per chunk, then `data: [DONE]`. An error mid-stream is sent as `data: {"error": ...}`."""

    async def events() -> AsyncIterator[dict]:
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))}
            except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band, as OpenAI does
                err = from_engine_error(exc, retry_after)
                yield {"data": json.dumps(error_body(err.status, err.message, err.param, err.code, err.type))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=ping, sep="\n", headers={"Cache-Control": "no-cache"})
