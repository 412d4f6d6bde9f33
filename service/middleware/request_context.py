"""Request ids, and the last line of defence: any exception nothing else handled becomes a JSON 500.

Every response carries `X-Request-ID` (the client's own, when it sent a sane one; else a fresh one).
An unexpected exception is logged with that id and its traceback, and answered
`{"detail": "internal error ... (request id ...)"}`, so a user can quote the id and an operator can
find the log line. This sits outside FastAPI's handlers: it also covers errors raised in middleware.
"""

from __future__ import annotations

import logging
import re
import uuid

from service.middleware.answers import count_error, send_json_error

log = logging.getLogger("piggyback.service")
REQUEST_ID_HEADER = b"x-request-id"
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class RequestContext:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), b"")
        request_id = offered.decode() if SANE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER, request_id.encode())
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("unhandled error [request id %s] %s %s", request_id, scope["method"], scope["path"])
            if started:  # too late for an error answer: let the server drop the connection
                raise
            count_error(scope, type(exc).__name__)
            detail = f"internal error ({type(exc).__name__}), a bug in the server; report request id {request_id}"
            await send_json_error(send, 500, detail, [id_header], close=True)
