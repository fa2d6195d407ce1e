"""HTTP-layer configuration (pydantic-settings, `LOOM_*` environment variables, overridden by `loom serve` flags)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOM_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    api_key: str | None = Field(None, description="when set, /v1/* needs `Authorization: Bearer <key>`")
    docs: Literal["public", "protected", "off"] = Field(
        "public", description="/docs, /redoc and /openapi.json: open to all, behind the API key like /v1/*, or not "
                              "served")
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests may finish after SIGTERM")
    max_body_bytes: int = Field(8 * 2 ** 20, ge=1024, description="request bodies over this answer 413")
    request_timeout: float | None = Field(None, gt=0, description="default timeout of every generating or scoring "
                                                                  "request, in seconds (off unless set)")
    read_timeout: float = Field(15.0, gt=0, description="seconds a client may take to send its request headers, and "
                                                        "the longest pause inside a request body; then 408 and close")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds sent with 429 (queue full)")
    ready_stall_seconds: float = Field(120.0, gt=0, description="/ready fails when the engine loop stalls this long")
    warmup: bool = Field(True, description="run a short request through the engine before /ready turns 200")
    sse_ping_seconds: float = Field(15.0, ge=0, description="keep-alive comment interval on SSE streams (0: off)")
    webui: bool = Field(True, description="serve the browser playground at / (off: / answers 404)")
