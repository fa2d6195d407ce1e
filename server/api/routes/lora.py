"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: LoRA adapters added and removed while serving.

A load reads and checks the adapter off the event loop and publishes it only when it fits, so a malformed one (400)
leaves everything served as it was. An unload takes the name away at once (new requests get 404) and returns without
waiting: requests already running finish on the adapter, whose weights go with the last of them."""
import asyncio

from fastapi import APIRouter

from server.api.deps import ReadyModel
from server.api.errors import APIError
from server.api.protocol.lora import LoadLoraRequest, LoraStatus, UnloadLoraRequest
from server.api.routes import ERROR_RESPONSES

router = APIRouter()


@router.post("/v1/load_lora_adapter", response_model=LoraStatus, responses=ERROR_RESPONSES,
             summary="Load a PEFT LoRA adapter, served by its name in `model`")
async def load_lora_adapter(body: LoadLoraRequest, served: ReadyModel) -> LoraStatus:
    if body.lora_name == served.name or body.lora_name in served.encoders:
        raise APIError(400, f"{body.lora_name!r} already names a model served here", param="lora_name")
    await asyncio.to_thread(served.engine.loras.load, body.lora_name, body.lora_path)
    return LoraStatus(lora_name=body.lora_name, status="loaded", parent=served.name)


@router.post("/v1/unload_lora_adapter", response_model=LoraStatus, responses=ERROR_RESPONSES,
             summary="Unload a LoRA adapter (its running requests finish on it)")
async def unload_lora_adapter(body: UnloadLoraRequest, served: ReadyModel) -> LoraStatus:
    if served.engine.loras.unload(body.lora_name) is None:
        raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded", param="lora_name",
                       code="model_not_found")
    return LoraStatus(lora_name=body.lora_name, status="unloaded", parent=served.name)
