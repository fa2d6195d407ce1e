"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's request shapes)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from server.api.protocol.common import Body


class LoadLoraRequest(Body):
    lora_name: str = Field(min_length=1, max_length=256, description="the name requests select it by (`model`)")
    lora_path: str = Field(min_length=1, description="a PEFT adapter directory on the server's disk")


class UnloadLoraRequest(Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="accepted for vLLM clients and ignored")


class LoraStatus(Body):
    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    status: Literal["loaded", "unloaded"]
    parent: str
