"""Liveness, readiness, Prometheus metrics and the version. These stay open when an API key is set (probes and scrapers)."""
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import LifecycleDep
from server.api.errors import error_body
from server.api.protocol import VersionResponse

router = APIRouter()


@router.get("/health", summary="Liveness: the process answers and its engine loop runs", response_model=dict,
            responses={503: {"description": "the engine loop has stopped: the process must be restarted"}})
async def health(lifecycle: LifecycleDep):
    reason = lifecycle.dead_reason()
    if reason:  # a liveness probe that fails restarts the process; /ready alone would only take it out of rotation
        return JSONResponse(error_body(503, reason, code="engine_unavailable", type="service_unavailable"),
                            status_code=503)
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: model loaded and warm, engine stepping, not draining",
            responses={503: {"description": "not ready (loading, warming up, engine stopped or draining)"}})
async def ready(lifecycle: LifecycleDep):
    reason = lifecycle.not_ready_reason()
    if reason:
        return JSONResponse(error_body(503, reason, code="not_ready", type="service_unavailable"), status_code=503,
                            headers={"Retry-After": "5"})
    return {"status": "ready", "model": lifecycle.model.name}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version", response_model=VersionResponse, summary="Loom's version")
async def loom_version() -> VersionResponse:
    try:
        return VersionResponse(version=version("loom-serve"))
    except PackageNotFoundError:  # a source tree that was never installed
        return VersionResponse(version="unknown")
