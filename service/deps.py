"""FastAPI dependencies as Annotated aliases: the engine, the batcher, readiness, the admin scheme."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.batcher import Batcher
from service.engine import Engine
from service.errors import NotReady
from service.metrics import Metrics
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(request: Request) -> Engine:
    state = request.app.state
    if not state.ready.is_set():
        raise NotReady(state.startup_error or "server is still loading the backbone and tasks; retry shortly")
    return state.engine


def get_batcher(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> Batcher:
    return request.app.state.batcher


# The token itself is checked by service.admin_auth.AdminAuth, from the headers, before any body is
# read; this dependency only declares the bearer scheme on the admin routes in the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="PIGGYBACK_ADMIN_TOKEN")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
AdminDep = Depends(_bearer)
