"""The generation requests the engine thread is running, seen from the engine thread: where each one's outputs go
(its sink), how many of its n sequences are still unfinished, and by when it must be done. A request leaves when its
last sequence finishes, when it fails, or when it is aborted; `expired` names the ones whose deadline has passed,
so the engine can abort them and free their blocks."""
from __future__ import annotations

from collections.abc import Callable

from server.engine.outputs import RequestOutput

Sink = Callable[[RequestOutput | BaseException], None]


class InflightRequests:
    def __init__(self) -> None:
        self._sinks: dict[str, Sink] = {}
        self._unfinished: dict[str, int] = {}  # request id -> sequences (of n) not yet finished
        self._deadlines: dict[str, float] = {}  # request id -> time.monotonic() deadline

    def add(self, request_id: str, sink: Sink, num_seqs: int, deadline: float | None) -> None:
        self._sinks[request_id] = sink
        self._unfinished[request_id] = num_seqs
        if deadline is not None:
            self._deadlines[request_id] = deadline

    def deliver(self, out: RequestOutput) -> None:
        """Hand a delta to its request's sink; the request leaves with its last sequence's last delta."""
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        sink(out)
        if out.finished:
            self._unfinished[out.request_id] -= 1
            if self._unfinished[out.request_id] == 0:
                self.forget(out.request_id)

    def fail(self, request_id: str, error: BaseException) -> None:
        """End a request with `error` (its caller raises it)."""
        sink = self._sinks.get(request_id)
        self.forget(request_id)
        if sink is not None:
            sink(error)

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self._sinks):
            self.fail(request_id, error)

    def forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._unfinished.pop(request_id, None)
        self._deadlines.pop(request_id, None)

    def expired(self, now: float) -> list[str]:
        """The requests whose deadline is `now` or earlier."""
        if not self._deadlines:
            return []
        return [request_id for request_id, when in self._deadlines.items() if when <= now]
