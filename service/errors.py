"""Service-side domain errors, and the one place where every domain error becomes an HTTP status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mask_store import (
    BackboneMismatch,
    CorruptArtifact,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
    TaskVersionExists,
    UnsupportedImage,
)
from mask_store.objects import ObjectConflict
from service.protocols import error_key_for

RETRY_AFTER_S = 1  # every 503 says when to come back: the overload and the outage are expected to pass


class ServiceError(Exception):
    status_code = 500


class InvalidImage(ServiceError):
    """Decodes as an image format but is damaged (truncated, bad header)."""

    status_code = 400


class NotAnImage(ServiceError):
    """Not a supported image format at all."""

    status_code = 415


class PayloadTooLarge(ServiceError):
    """Too many bytes, pixels or images."""

    status_code = 413


class BadRequest(ServiceError):
    status_code = 400


class NotReady(ServiceError):
    status_code = 503


class Overloaded(ServiceError):
    """Too many images already wait for the engine, or the server is draining: retry after a moment."""

    status_code = 503


class UnsupportedEncoding(ServiceError):
    """A Content-Encoding the server does not decode (requests are sent uncompressed)."""

    status_code = 415


class ClientDisconnected(ServiceError):
    """The client closed the connection while its images were queued; nobody reads the answer."""

    status_code = 499


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its images reached a forward pass."""

    status_code = 504


STATUS_BY_ERROR: dict[type[Exception], int] = {
    TaskNotFound: 404,
    CorruptArtifact: 422,
    BackboneMismatch: 422,
    TaskVersionExists: 409,
    ObjectConflict: 409,
    UnsupportedImage: 415,
    StoreFull: 507,  # before its base class: the first match wins
    StoreUnavailable: 503,
}


def status_for(exc: Exception) -> int:
    """The HTTP status an exception becomes (500 for anything not a known client error)."""
    if isinstance(exc, ServiceError | StarletteHTTPException):
        return exc.status_code
    return next((status for error, status in STATUS_BY_ERROR.items() if isinstance(exc, error)), 500)


def error_kind(exc: Exception) -> str:
    """A bounded label for metrics: the error's class name."""
    return type(exc).__name__


ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"detail": {"type": "string", "title": "Detail"}},
    "required": ["detail"],
}


def _publish_error_schema(app: FastAPI) -> None:
    """The published 422 body is what the handlers below send, `{"detail": str}`, not FastAPI's list."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        schema.get("components", {}).get("schemas", {})["HTTPValidationError"] = ERROR_SCHEMA
        return schema

    app.openapi = openapi


def error_response(request: Request, status: int, detail: str, kind: str, headers=None) -> JSONResponse:
    """Every error the app answers: counted by kind, worded in the protocol of the path
    (`service.protocols`), and a 503 says when to retry."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(kind=kind).inc()
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse({error_key_for(request.url.path): detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    _publish_error_schema(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), f"HTTP{exc.status_code}", exc.headers)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc), error_kind(exc))

    for error, status in STATUS_BY_ERROR.items():
        app.add_exception_handler(
            error, lambda request, exc, status=status: error_response(request, status, str(exc), error_kind(exc))
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, validation_message(exc), "RequestValidationError")


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)
