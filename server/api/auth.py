"""Optional API-key auth for /v1/*: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) when
`--api-key` / `LOOM_API_KEY` is set.
With `--docs protected` the key also guards /docs, /redoc and /openapi.json (default `public`: see ServerSettings).

Checked by ASGI middleware, before the body is even read (an unauthenticated client learns nothing about its
request); the `require_api_key` dependency declares the scheme in the OpenAPI docs and checks again."""
from __future__ import annotations

import json
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError, count_error, error_body
from server.api.messages.errors import PREFIX as ANTHROPIC_PREFIX
from server.api.messages.errors import anthropic_error_body

bearer = HTTPBearer(auto_error=False, description="the server's API key (only when it was started with one)")
PROTECTED_PREFIX = "/v1/"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def check_key(authorization: str | None, expected: str, x_api_key: str | None = None) -> str | None:
    """None when `authorization` (or, without it, `x_api_key`) carries the key, else why not."""
    if x_api_key is not None and not authorization:
        authorization = f"Bearer {x_api_key}"
    scheme, _, token = (authorization or "").partition(" ")
    if not authorization or scheme.lower() != "bearer" or not token.strip():
        return "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        return "incorrect API key"
    return None


async def require_api_key(request: Request,
                          creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    expected = request.app.state.settings.api_key
    if expected:
        problem = check_key(request.headers.get("authorization"), expected, request.headers.get("x-api-key"))
        if problem:
            raise APIError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, protect_docs: bool = False):
        self.app, self.api_key = app, api_key
        self.exact = DOCS_PATHS if protect_docs else ()

    def guards(self, path: str) -> bool:
        return path.startswith(PROTECTED_PREFIX) or path in self.exact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key and scope["type"] == "http" and self.guards(scope.get("path", "")):
            headers = dict(scope.get("headers") or ())
            x_api_key = headers.get(b"x-api-key")
            problem = check_key(headers.get(b"authorization", b"").decode("latin-1") or None, self.api_key,
                                x_api_key.decode("latin-1") if x_api_key is not None else None)
            if problem:
                count_error(scope.get("app"), 401)
                anthropic = scope.get("path", "").startswith(ANTHROPIC_PREFIX)
                body = json.dumps(anthropic_error_body(401, problem) if anthropic
                                  else error_body(401, problem, code="invalid_api_key")).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
