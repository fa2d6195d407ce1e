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


def get_ready_model(request: Request) -> ServedModel:
    """Every /v1 route's gate: the model is loaded and warm, the engine stepping, the server not draining."""
    return request.app.state.lifecycle.require_ready()


def get_tracker(request: Request) -> RequestTracker:
    return request.app.state.tracker


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
ReadyModel = Annotated[ServedModel, Depends(get_ready_model)]
Tracker = Annotated[RequestTracker, Depends(get_tracker)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
