"""What the server says about itself: GET /v1/models, /v1/status (the playground's status strip) and /version."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer

from server.api.protocol.common import Body


class ModelCard(Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loom"
    max_model_len: int | None = None
    capabilities: list[str] | None = Field(None, description="the routes this model serves")
    root: str | None = Field(None, description="a LoRA adapter's directory")
    parent: str | None = Field(None, description="the base model a LoRA adapter runs on")
    state: Literal["loaded", "loading", "unloaded", "unloading"] | None = Field(
        None, description="with --models-dir: whether the model is loaded (absent otherwise)")

    @model_serializer(mode="wrap")
    def _state_only_when_known(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("state") is None:
            data.pop("state", None)
        return data


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(Body):
    version: str


class StatusResponse(Body):
    """What the playground's status strip shows: the model and the engine's load, right now."""
    ready: bool
    reason: str | None = Field(None, description="why not ready (loading, warming up, draining, engine stopped)")
    model: str | None = None
    embedding_model: str | None = Field(None, description="the encoder serving /v1/embeddings and /v1/rerank, if any")
    max_model_len: int | None = None
    running: int = Field(0, description="sequences in the running batch")
    waiting: int = Field(0, description="sequences waiting to be scheduled")
    kv_cache_usage: float = Field(0.0, description="fraction of KV-cache blocks in use (0..1)")
    kv_cache_blocks: int = 0
    block_size: int | None = None
    prompt_tokens: int = Field(0, description="prompt tokens processed since start")
    generation_tokens: int = Field(0, description="tokens generated since start")
