"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import MetricsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if state.ready.is_set():
        engine = state.engine
        return JSONResponse({"status": "ready", "tasks": len(engine.tasks()), "failed_tasks": dict(engine.failed)})
    detail = state.startup_error or "loading backbone and tasks"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.get("/metrics")
def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
