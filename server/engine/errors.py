"""The engine's failures, as exceptions: `AsyncEngine` raises them to its callers (never an in-band "error" finish
reason), and the API maps each type to one HTTP status."""
from __future__ import annotations


class EngineError(Exception):
    """Base of every failure the engine reports for a request."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses. `param` names the offending field and `code` the machine-readable reason
    (OpenAI's error `param` and `code`, e.g. `context_length_exceeded`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(EngineError):
    """Too many requests (or prompt tokens) are waiting; the client should retry after `retry_after` seconds, the
    engine's estimate of when the queue falls under its cap (None: no estimate yet)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusyError(EngineError):
    """A resource that requests share is saturated (every grammar compile worker busy and its queue full, say): the
    server's capacity, not the client's rate. Retry after `retry_after` seconds; `code` names the resource."""

    def __init__(self, message: str, code: str, retry_after: int):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


class RequestTimeoutError(EngineError):
    """The request's deadline passed before it finished; it was aborted."""


class EngineDeadError(EngineError):
    """The engine loop has stopped; no request can be served."""


class InternalEngineError(EngineError):
    """A step failed while running this request (the engine itself survived)."""
