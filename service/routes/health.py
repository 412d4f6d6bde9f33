"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import MetricsDep
from service.schemas import Unready

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Unready, "description": "loading, failed to start, or draining"}})
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if state.drain.draining:
        return JSONResponse({"status": "draining", "detail": "shutting down"}, status_code=503)
    if state.ready.is_set():
        registry = state.registry
        body = {
            "status": "ready",
            "tasks": registry.servable_count(),
            "resident_tasks": len(registry.tasks()),
            "failed_tasks": dict(registry.failed),
        }
        if registry.store_problem is not None:  # still serving what it has: ready, and saying why it cannot follow
            body["store_problem"] = registry.store_problem
        return JSONResponse(body)
    detail = state.startup_error or getattr(state, "store_wait", None) or "loading backbone and tasks"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
