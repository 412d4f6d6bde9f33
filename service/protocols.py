"""What a front door declares (`Protocol`: path prefix, error body key, prediction paths) and the
questions asked of all of them.

Each protocol is declared once, as `PROTOCOL` in its own router module (`service.routes`). Everything
outside those modules that needs to know about protocols (the ASGI middleware answering before the app,
the error handlers, the Ray router) asks here, so a third protocol is its router module and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, create_model

ERROR_MEANINGS = {
    400: "malformed request, or a damaged image",
    401: "no admin token",
    403: "wrong admin token, or admin routes disabled (no PIGGYBACK_ADMIN_TOKEN)",
    404: "no such task (or version)",
    408: "the request body did not arrive within PIGGYBACK_BODY_TIMEOUT_S",
    409: "a conflict with what the store holds (a version not higher than the live one)",
    413: "too many images, bytes or pixels",
    415: "not a supported image format, or an unsupported Content-Encoding",
    422: "invalid parameters, or an artifact that does not fit this backbone",
    503: "not ready, overloaded, draining, or the store unreachable: retry after Retry-After seconds",
    504: "the request's deadline passed before its answer",
    507: "the store is out of space",
}


@dataclass(frozen=True)
class Protocol:
    name: str
    prefix: str  # every route of the protocol is under it
    error_key: str  # errors are JSON objects {error_key: "message"}
    prediction: re.Pattern  # POST paths that run a prediction; group "task" names the task
    task_route: re.Pattern  # any path about one task (routing to the replica that holds it)
    error_model: type[BaseModel] = field(init=False)  # the error body, as published in the OpenAPI document

    def __post_init__(self) -> None:
        model = create_model(f"{self.name.capitalize()}Error", **{self.error_key: (str, ...)})
        object.__setattr__(self, "error_model", model)

    def owns(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def errors(self, *statuses: int) -> dict[int | str, dict]:
        """FastAPI `responses=` documenting these error statuses with this protocol's error body."""
        documented: dict[int | str, dict] = {}
        for status in statuses:
            documented[status] = {"model": self.error_model, "description": ERROR_MEANINGS[status]}
            if status == 503:
                documented[status]["headers"] = {
                    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
                }
        return documented


DEFAULT_ERROR_KEY = "detail"  # routes outside any prediction protocol (admin, health) answer like /tasks


def declared() -> tuple[Protocol, ...]:
    """Every front door's declaration (the route modules are imported on the first call)."""
    from service.routes import front_doors

    return front_doors()


def error_key_for(path: str) -> str:
    """The JSON key of an error message on `path`."""
    return next((p.error_key for p in declared() if p.owns(path)), DEFAULT_ERROR_KEY)


def is_prediction(method: str, path: str) -> bool:
    """Whether a request runs a prediction, through any front door."""
    return method == "POST" and any(p.prediction.match(path) for p in declared())


def task_of(path: str) -> str | None:
    """The task a request is about, if its path names one."""
    for protocol in declared():
        if found := protocol.task_route.match(path):
            return found["task"]
    return None
