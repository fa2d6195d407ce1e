"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with a fitting status.

FastAPI's own 422 validation body becomes a 400 `invalid_request_error` naming the offending field, each engine
error type maps to one status (invalid 400, queue full 429, timeout 504, engine dead or busy 503, failed step 500), and
anything unexpected is a 500 in the same shape (never a stack trace)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.engine import (
    EngineDeadError,
    EngineError,
    InternalEngineError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    ServerBusyError,
)

log = logging.getLogger("loom.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """Raise anywhere in a route to answer with an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
        self.headers = headers


class ClientGoneError(Exception):
    """The client closed the connection before its (non-streamed) answer was ready; its work was cancelled."""


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code, exc.type), status_code=exc.status,
                        headers=exc.headers)


def from_engine_error(exc: BaseException, retry_after: int = 1) -> APIError:
    """The API error for an exception raised while serving a request (typically by AsyncEngine.generate)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):  # Retry-After: the engine's estimate of the drain, else the setting
        return APIError(429, f"the server is busy: {exc}; retry later", code="rate_limit_exceeded",
                        headers={"Retry-After": str(exc.retry_after or retry_after)})
    if isinstance(exc, ServerBusyError):
        return APIError(503, str(exc), code=exc.code, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), code="request_timeout")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not available: {exc}", code="engine_unavailable")
    if isinstance(exc, InternalEngineError):
        return APIError(500, "the engine failed this request", code="engine_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if parts and parts[0].isdigit():  # a JSON decode error's character offset
        parts = parts[1:]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON: {detail}", None
    param = _param_of(tuple(first.get("loc", ())))
    parts = []
    for e in errors[:3]:
        where = _param_of(tuple(e.get("loc", ())))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


def count_error(app, status: int) -> None:
    """Count an error answer in `loom_request_errors_total` (middlewares that answer before the app call it too)."""
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(status)).inc()


def _respond(request: Request, exc: APIError) -> JSONResponse:
    count_error(request.app, exc.status)
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _respond(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ClientDisconnect):  # the body never came (client gone, or the server's read
            return JSONResponse(error_body(499, "client closed the request"), status_code=499)  # timeout): uncounted
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        return _respond(request, APIError(exc.status_code, message, code=getattr(exc, "code", None),
                                          headers=getattr(exc, "headers", None)))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: Exception) -> JSONResponse:
        return _respond(request, from_engine_error(exc, request.app.state.settings.retry_after))

    @app.exception_handler(ClientGoneError)
    async def _gone(request: Request, exc: ClientGoneError) -> JSONResponse:  # nobody reads it; nginx's 499
        return JSONResponse(error_body(499, "client closed the request"), status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return _respond(request, APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
