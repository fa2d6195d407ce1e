"""Anthropic's error shape for the Messages routes: `{"type": "error", "error": {"type", "message"}}`, with the
statuses and error types Anthropic's clients know (their SDK raises one exception class per status).

Every failure of a Messages route, including the body's validation, the API key and readiness dependencies, and the
engine's errors, goes through `AnthropicRoute`, so none of them reaches the app's OpenAI-shaped handlers."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.api.errors import APIError, ClientGoneError, _validation_message, count_error, from_engine_error
from server.api.messages.convert import messages_param
from server.engine import EngineError

log = logging.getLogger("loom.api")

PREFIX = "/v1/messages"  # the paths answered in this shape
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
               504: "timeout_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_error(exc: BaseException, retry_after: int = 1) -> APIError:
    """The API error (status, message, headers) of any exception raised while serving a Messages request."""
    if isinstance(exc, RequestValidationError):
        return APIError(400, _validation_message(exc)[0])
    if isinstance(exc, StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    if isinstance(exc, (APIError, EngineError)):
        return naming_its_field(from_engine_error(exc, retry_after))
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def naming_its_field(err: APIError) -> APIError:
    """Anthropic's errors carry no `param`: the message starts with the field it is about, under the Messages
    request's name for it (`max_tokens: ...`), as Anthropic's own messages do."""
    field = messages_param(err.param)
    if field is None or re.match(rf"{re.escape(field)}\b", err.message):
        return err
    return APIError(err.status, f"{field}: {err.message}", param=field, code=err.code, type=err.type,
                    headers=err.headers)


def anthropic_response(request: Request, exc: BaseException) -> JSONResponse:
    err = anthropic_error(exc, request.app.state.settings.retry_after)
    count_error(request.app, err.status)
    return JSONResponse(anthropic_error_body(err.status, err.message), status_code=err.status, headers=err.headers)


class AnthropicRoute(APIRoute):
    """An APIRoute whose every error answers in Anthropic's shape (validation and dependencies included)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientGoneError:
                raise  # nobody is there to read an answer: the app's 499
            except StarletteHTTPException as exc:
                if isinstance(exc.__cause__, ClientDisconnect):
                    raise
                return anthropic_response(request, exc)
            except Exception as exc:  # noqa: BLE001 - every error of these routes is answered in their shape
                return anthropic_response(request, exc)

        return route
