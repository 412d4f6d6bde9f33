"""FastAPI dependencies as Annotated aliases: the engine, the batcher, readiness, the admin check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.batcher import Batcher
from service.engine import Engine
from service.errors import AdminDisabled, NotReady
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


_bearer = HTTPBearer(auto_error=False)


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if settings.admin_token is None:
        raise AdminDisabled("admin API disabled: start the server with PIGGYBACK_ADMIN_TOKEN set")
    if credentials is None:
        raise HTTPException(
            401, "missing token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    if not secrets.compare_digest(credentials.credentials.encode(), settings.admin_token.get_secret_value().encode()):
        raise HTTPException(403, "wrong admin token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
AdminDep = Depends(require_admin)
