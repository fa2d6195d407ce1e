"""GET /v1/status: the model and the engine's load as one small JSON object, for the playground's status strip (the
same numbers /metrics exports, without parsing Prometheus text). Answers while the model loads, with `ready: false`."""
from fastapi import APIRouter

from server.api.deps import LifecycleDep
from server.api.encoding import encoders_for
from server.api.protocol import StatusResponse
from server.api.routes import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/status", response_model=StatusResponse, responses={401: ERROR_RESPONSES[401]},
            summary="The served model and the engine's current load")
async def status(lifecycle: LifecycleDep) -> StatusResponse:
    reason, served = lifecycle.not_ready_reason(), lifecycle.model
    if served is None:
        return StatusResponse(ready=False, reason=reason)
    s = served.engine.stats()
    embedders = encoders_for(served, "embed")  # the first is the one the encoder routes default to
    return StatusResponse(ready=reason is None, reason=reason, model=served.name,
                          embedding_model=embedders[0].name if embedders else None,
                          max_model_len=served.max_model_len, running=s.running, waiting=s.waiting,
                          kv_cache_usage=s.kv_usage, kv_cache_blocks=s.num_blocks, block_size=s.block_size,
                          prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens)
