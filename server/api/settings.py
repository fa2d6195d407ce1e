"""HTTP-layer configuration (pydantic-settings, `LOOM_*` environment variables, overridden by `loom serve` flags)."""
from __future__ import annotations

from pathlib import Path
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
    responses_store_max_entries: int = Field(
        1024, ge=0, description="/v1/responses kept in memory for GET and previous_response_id, least recently used "
                                "out first (0: none are stored)")
    responses_store_max_age: float = Field(3600.0, gt=0, description="seconds a stored response is kept")
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(
        None, description="split the model's <think>...</think> out of answers (chat `reasoning_content`, Messages "
                          "thinking blocks); off unless set")
    tool_call_parser: Literal["hermes", "llama3_json", "qwen3_coder", "pythonic", "mistral"] | None = Field(
        None, description="the format tool calls are parsed from, forced in and written into prompts (default: the "
                          "chat template's, else hermes)")
    models_dir: Path | None = Field(None, description="serve every .gguf file and Hugging Face directory here by its "
                                                      "name, loaded on first use, beside the default model")
    max_loaded_models: int = Field(1, ge=1, description="--models-dir models loaded at once (the default model is "
                                                        "not counted); least recently used unloaded first")
    model_idle_unload: float = Field(0.0, ge=0, description="seconds unused after which a --models-dir model is "
                                                            "unloaded (0: never)")
    model_memory_headroom: float = Field(1.0, ge=0, description="GiB of memory kept free when a --models-dir model "
                                                                "loads: least recently used ones are unloaded to make "
                                                                "room; one that cannot fit even alone answers 503")
    model_load_wait: float = Field(300.0, gt=0, description="seconds a request without a timeout waits for its "
                                                            "model to load before a 503 with Retry-After")
