"""GET /v1/models: the one model this server serves."""
from fastapi import APIRouter

from server.api.deps import ReadyModel
from server.api.protocol import ModelCard, ModelList
from server.api.routes import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List the served model")
async def list_models(served: ReadyModel) -> ModelList:
    return ModelList(data=[ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len)])
