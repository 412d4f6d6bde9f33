"""FastAPI dependencies as Annotated aliases: the task registry, the data plane, readiness, the admin scheme."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPBearer

from service.deadlines import Deadline, disconnect_waiter
from service.errors import NotReady
from service.inference import DataPlane
from service.metrics import Metrics
from service.registry import TaskRegistry
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_registry(request: Request) -> TaskRegistry:
    state = request.app.state
    if not state.ready.is_set():
        raise NotReady(state.startup_error or "server is still loading the backbone and tasks; retry shortly")
    return state.registry


async def get_data_plane(
    request: Request, registry: Annotated[TaskRegistry, Depends(get_registry)]
) -> AsyncIterator[DataPlane]:
    """The data plane, for one admitted prediction: refused with 503 while draining, counted until it finishes."""
    with request.app.state.drain.admit():
        yield request.app.state.data_plane


def get_deadline(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    x_request_timeout: Annotated[
        float | None,
        Header(gt=0, allow_inf_nan=False, description="seconds this request may take; capped by the server's limit"),
    ] = None,
) -> Deadline:
    """PIGGYBACK_REQUEST_TIMEOUT_S from the request's arrival, or less if the client asks; also watches
    for its disconnect."""
    seconds = settings.request_timeout_s
    if x_request_timeout is not None:
        seconds = min(seconds, x_request_timeout)
    arrived = getattr(request.state, "arrived", time.monotonic())
    return Deadline(arrived + seconds, disconnect_waiter(request))


# The token itself is checked by service.middleware.admin_auth.AdminAuth, from the headers, before any body is
# read; this dependency only declares the bearer scheme on the admin routes in the OpenAPI document.
_bearer = HTTPBearer(auto_error=False, description="PIGGYBACK_ADMIN_TOKEN")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[TaskRegistry, Depends(get_registry)]
DataPlaneDep = Annotated[DataPlane, Depends(get_data_plane)]
AdminDep = Depends(_bearer)
DeadlineDep = Annotated[Deadline, Depends(get_deadline)]
