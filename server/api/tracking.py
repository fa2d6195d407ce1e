"""Request tracking: every engine request the API starts goes through `RequestTracker.generate`, which times it for
the metrics and remembers it while in flight (the graceful drain waits for, then aborts, what is left)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator

from server.api.errors import APIError
from server.api.metrics import Metrics
from server.engine import AsyncEngine, InvalidRequestError, RequestOutput, RequestTimeoutError, SamplingParams


class RequestTracker:
    def __init__(self, metrics: Metrics, default_timeout: float | None = None):
        self.metrics, self.default_timeout = metrics, default_timeout
        self.engine: AsyncEngine | None = None
        self.model = "default"  # the served name of the engine's base model (metrics label it and its adapters)
        self.accepting = True  # off once the drain timeout has passed
        self.active: set[str] = set()  # engine request ids in flight
        self.http_inflight = 0  # /v1 HTTP requests in flight (streams included)
        self._ids = itertools.count()

    def deadline(self, timeout: float | None) -> float | None:
        """The `time.monotonic()` deadline of a request that arrives now with this `timeout` (or the default)."""
        timeout = timeout or self.default_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _require_accepting(self) -> None:
        if self.engine is None or not self.accepting:
            raise APIError(503, "the server is shutting down", code="not_ready", headers={"Retry-After": "5"})

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Admit a task request (summarize, zero-shot classify) against the queue caps once, as one request: the
        engine requests it sends from inside the block are part of it (AsyncEngine.admit_task)."""
        self._require_accepting()
        with self.engine.admit_task():
            yield

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, endpoint: str = "other",
                       request_id: str | None = None, priority: int = 0,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate, tracked: leaving early (client gone, task cancelled) aborts the request."""
        self._require_accepting()
        request_id = request_id or f"{endpoint}-{next(self._ids)}"
        timer = self.metrics.timer(endpoint, params.lora.name if params.lora is not None else self.model)
        stream = self.engine.generate(prompt_token_ids, params, request_id=request_id, priority=priority,
                                      deadline=deadline)
        self.active.add(request_id)
        try:
            async for out in stream:
                timer.observe(out)
                yield out
            timer.done()
        except (GeneratorExit, asyncio.CancelledError):  # the caller left: the engine request is aborted below
            timer.abandoned(params.n)
            raise
        except RequestTimeoutError:
            timer.abandoned(params.n, "timeout")
            raise
        finally:
            self.active.discard(request_id)
            await stream.aclose()  # aborts in the engine if it had not finished

    async def encode(self, model: str, inputs: list[list[int]], endpoint: str,
                     deadline: float | None = None) -> list[list[float]]:
        """AsyncEngine.encode, tracked and counted per model (requests by outcome, tokens, latency)."""
        self._require_accepting()
        request_id = f"{endpoint}-{next(self._ids)}"
        started, outcome = time.perf_counter(), "error"
        self.active.add(request_id)
        try:
            rows = await self.engine.encode(model, inputs, request_id=request_id, deadline=deadline)
            outcome = "ok"
            return rows
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "abort"
            raise
        except RequestTimeoutError:
            outcome = "timeout"
            raise
        except InvalidRequestError:
            outcome = "invalid"
            raise
        finally:
            self.active.discard(request_id)
            self.metrics.observe_encode(model, endpoint, outcome, sum(map(len, inputs)),
                                        time.perf_counter() - started)

    def abort_all(self) -> int:
        """Abort every tracked request (the drain timeout passed); returns how many."""
        self.accepting = False
        if self.engine is not None:
            for request_id in list(self.active):
                self.engine.abort(request_id)
        return len(self.active)
