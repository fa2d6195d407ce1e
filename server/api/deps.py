"""FastAPI dependencies: what a route may ask for. Everything hangs off `app.state` (settings, lifecycle, tracker,
metrics), built by the app factory; nothing is module-global, so tests can build several apps in one process."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.lifecycle import Lifecycle, ServedModel
from server.api.settings import ServerSettings
from server.api.tracking import RequestTracker


def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


async def get_ready_model(request: Request) -> ServedModel:
    """Every /v1 route's gate: the model is loaded and warm, the engine stepping, the server not draining; with
    --models-dir, the model the body names (loaded on first use)."""
    return await request.app.state.lifecycle.served_for(request)


async def get_tracker(request: Request) -> RequestTracker:
    lifecycle = request.app.state.lifecycle
    if lifecycle.pool is None:
        return request.app.state.tracker
    return (await lifecycle.served_for(request)).tracker


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
ReadyModel = Annotated[ServedModel, Depends(get_ready_model)]
Tracker = Annotated[RequestTracker, Depends(get_tracker)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
