"""GET /v1/models: the generator, its LoRA adapters (with their `parent`) and the encoders served beside it, each
with the routes it serves; with --models-dir, every model of the directory too, with its `state`."""
from fastapi import APIRouter

from server.api.deps import LifecycleDep, ReadyModel
from server.api.protocol import ModelCard, ModelList
from server.api.routes import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List the served models")
async def list_models(served: ReadyModel, lifecycle: LifecycleDep) -> ModelList:
    encoders = list(served.encoders.values())
    generator = ["completions", "chat", "summarize", "classify", "tokenize"]
    if any(e.task == "classify" for e in encoders):
        generator.remove("classify")
    cards = [ModelCard(id=served.name, created=served.created, max_model_len=served.max_model_len,
                       capabilities=generator, state="loaded" if lifecycle.pool is not None else None)]
    for entry in lifecycle.pool.entries.values() if lifecycle.pool is not None else ():  # --models-dir
        if entry.name != served.name:
            cards.append(ModelCard(id=entry.name, created=entry.created, root=entry.path, state=entry.state,
                                   max_model_len=entry.served.max_model_len if entry.served else None,
                                   capabilities=["completions", "chat", "messages", "responses", "summarize",
                                                 "classify", "tokenize"]))
    for adapter in served.engine.loras.adapters():  # LoRA adapters, on the generating routes of their parent
        cards.append(ModelCard(id=adapter.name, created=adapter.created, max_model_len=served.max_model_len,
                               capabilities=["completions", "chat", "messages", "responses", "tokenize"],
                               root=adapter.path, parent=served.name))
    for enc in encoders:
        cards.append(ModelCard(id=enc.name, created=served.created, max_model_len=enc.max_len,
                               capabilities=["embeddings", "rerank", "score"] if enc.task == "embed" else ["classify"]))
    return ModelList(data=cards)
