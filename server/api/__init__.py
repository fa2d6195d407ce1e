"""HTTP layer: FastAPI app factory, routes, pydantic protocol, SSE, auth, errors, metrics. It reaches the engine only
through AsyncEngine (generate, abort, stats, healthy).

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
