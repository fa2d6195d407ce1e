"""GET /v1/models: the one model this server serves."""
from fastapi import APIRouter

from server.api.protocol import ModelCard, ModelList
from server.api.routes import ERROR_RESPONSES
from server.api.serving import ReadyServing

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List the served model")
async def list_models(serving: ReadyServing) -> ModelList:
    return ModelList(data=[ModelCard(id=serving.model_name, created=serving.created,
                                     max_model_len=serving.max_model_len)])
