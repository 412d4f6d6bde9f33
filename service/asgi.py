"""Answering from pure ASGI middleware, before FastAPI (and its error handlers) ever sees the request."""

from __future__ import annotations

import json


def has_body(scope) -> bool:
    """Whether the request announces a body (a non-zero Content-Length, or a chunked one)."""
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def count_error(scope, kind: str) -> None:
    """Count an error answered by middleware in the app's `piggyback_errors` metric, like the handlers do."""
    app = scope.get("app")
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.errors.labels(kind=kind).inc()


async def send_json_error(send, status: int, detail: str, headers=(), close: bool = False, key: str = "detail") -> None:
    """Send `{key: detail}` with `status` (`key` is "error" under the Open Inference Protocol). `close`
    ends the connection afterwards: use it when the request body is left unread, so the client stops
    sending instead of uploading the rest for nothing."""
    body = json.dumps({key: detail}).encode()
    response_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    if close:
        response_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})
