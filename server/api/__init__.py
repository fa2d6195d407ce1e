"""HTTP layer: FastAPI app factory, routes, pydantic protocol, SSE, auth, errors, metrics. It reaches the engine only
through this part of AsyncEngine, and the types server/engine exports (SamplingParams, the outputs, the errors):
- requests: `generate`, `encode`, `abort`, `compile_grammar`, and `admit_task()` (a task's engine requests admitted
  to the queue as one);
- state: `stats()`, `healthy`, `liveness()` (alive, last step time, what stopped it);
- metrics: `add_step_observer`, `add_encode_observer`;
- lifecycle: `warm_grammars()` (once ready), `shutdown()`;
- facts fixed at start: `tokenizer`, `max_model_len`, `vocab_size`, `encoders` (the encoder models by name).

`create_app` and `ServerSettings` are imported lazily, so `loom generate` (which only registers `loom serve`'s
flags) does not pay for FastAPI."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.api.app import create_app
    from server.api.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from server.api.app import create_app
        return create_app
    if name == "ServerSettings":
        from server.api.settings import ServerSettings
        return ServerSettings
    raise AttributeError(name)
