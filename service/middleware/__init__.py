"""The ASGI middleware: everything that answers or shapes a request before FastAPI routes it, and the
one function that stacks it in order."""

from __future__ import annotations

from fastapi import FastAPI

from service.middleware.admin_auth import AdminAuth
from service.middleware.arrival import StampArrival
from service.middleware.body_deadline import BodyDeadline
from service.middleware.body_size import BodySizeLimit
from service.middleware.prediction_limit import PredictionLimit
from service.middleware.replica_header import ReplicaHeader
from service.middleware.request_context import RequestContext
from service.settings import Settings


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """The ASGI middleware, outermost first. Why this order:

    1. `ReplicaHeader`: even a 500 names the replica that answered.
    2. `RequestContext`: request id, and a JSON 500 for anything the layers below raise.
    3. `StampArrival`: a request's deadline and body bound count from here, before any work.
    4. `BodyDeadline`: a body trickling in is cut off (408/504), whoever reads it below.
    5. `PredictionLimit`: shed at the door from the headers; a slot is held once the body is complete.
    6. `AdminAuth`: the admin token, from the headers: an unauthenticated client uploads nothing.
    7. `BodySizeLimit`: Content-Length checked up front, streamed bytes counted as they arrive.
    """
    outermost_first = [
        (ReplicaHeader, {"replica": app.state.replica}),
        (RequestContext, {}),
        (StampArrival, {}),
        (BodyDeadline, {"body_timeout_s": settings.body_timeout_s, "request_timeout_s": settings.request_timeout_s}),
        (
            PredictionLimit,
            {
                "limit": settings.max_concurrent_predictions,
                "max_body_bytes": settings.max_request_bytes,
                "max_receiving": 2 * settings.max_concurrent_predictions,
            },
        ),
        (AdminAuth, {"token": settings.admin_token}),
        (
            BodySizeLimit,
            {
                "limits": {"/admin/": settings.max_artifact_bytes + 1024 * 1024},
                "default": settings.max_request_bytes,  # /v2 infer bodies too: the same bound as a multipart predict
            },
        ),
    ]
    for middleware, options in reversed(outermost_first):  # Starlette wraps each new one around the rest
        app.add_middleware(middleware, **options)
