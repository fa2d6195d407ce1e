"""GET /v1/models: the generator and the encoders served beside it, each with the routes it serves."""
from fastapi import APIRouter

from server.api.deps import ReadyModel
from server.api.protocol import ModelCard, ModelList
from server.api.routes import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List the served models")
async def list_models(served: ReadyModel) -> ModelList:
    encoders = list(served.encoders.values())
    generator = ["completions", "chat", "summarize", "classify", "tokenize"]
    if any(e.task == "classify" for e in encoders):
        generator.remove("classify")
    cards = [ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len,
                       capabilities=generator)]
    for enc in encoders:
        cards.append(ModelCard(id=enc.name, created=served.created, max_model_len=enc.max_len,
                               capabilities=["embeddings", "rerank", "score"] if enc.task == "embed" else ["classify"]))
    return ModelList(data=cards)
