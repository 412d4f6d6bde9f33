"""ASGI middleware that refuses oversized request bodies with 413 before they are parsed or spooled."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Limit by path prefix: checks Content-Length up front and counts streamed (chunked) bytes too.

    `error_keys` names, by path prefix, the JSON key of the refusal's message where a protocol wants
    another than "detail" (the Open Inference Protocol's "error").
    """

    def __init__(self, app, limits: dict[str, int], default: int, error_keys: dict[str, str] | None = None):
        self.app = app
        self.limits = sorted(limits.items(), key=lambda item: -len(item[0]))
        self.default = default
        self.error_keys = error_keys or {}

    def _limit(self, path: str) -> int:
        return next((limit for prefix, limit in self.limits if path.startswith(prefix)), self.default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit, self._error_key(scope["path"]))
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, limit, self._error_key(scope["path"]))

    def _error_key(self, path: str) -> str:
        return next((key for prefix, key in self.error_keys.items() if path.startswith(prefix)), "detail")

    @staticmethod
    async def _refuse(send, limit: int, key: str) -> None:
        body = json.dumps({key: f"request body larger than {limit} bytes; send fewer or smaller files"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
