"""Answering from pure ASGI middleware, before FastAPI (and its error handlers) ever sees the request."""

from __future__ import annotations

import json

from service.protocols import error_key_for


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


class RefusedMidBody(Exception):
    """Raised from a wrapped `receive` to stop a request while (or once) its body arrives.

    `close`: the rest of the body is left unread, so the connection is closed after the answer.
    """

    def __init__(self, status: int, detail: str, kind: str, headers=(), close: bool = True) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers, self.close = status, detail, kind, list(headers), close

    async def answer(self, scope, send) -> None:
        count_error(scope, self.kind)
        key = error_key_for(scope["path"])
        await send_json_error(send, self.status, self.detail, self.headers, close=self.close, key=key)


async def run_refusing_mid_body(app, scope, receive, send) -> None:
    """Run `app` with a `receive` that may raise `RefusedMidBody`.

    Whatever the app makes of the cut-off read (FastAPI's form parsing answers 400 "error parsing the
    body", a route a 500) is replaced by the refusal, sent once, as long as no answer had begun.
    """
    refusal: RefusedMidBody | None = None
    started = False

    async def watched_receive():
        nonlocal refusal
        try:
            return await receive()
        except RefusedMidBody as exc:
            if not started and refusal is None:
                refusal = exc
            raise

    async def guarded_send(message):
        nonlocal started
        if refusal is not None:
            if not started:
                started = True
                await refusal.answer(scope, send)
            return
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, watched_receive, guarded_send)
    except RefusedMidBody:
        if refusal is None:  # refused after the answer began: too late, the server drops the connection
            raise
    if refusal is not None and not started:
        started = True
        await refusal.answer(scope, send)
