"""ASGI middleware that refuses oversized request bodies with 413 before they are parsed or spooled."""

from __future__ import annotations

from service.middleware.answers import RefusedMidBody, run_refusing_mid_body


class BodyTooLarge(RefusedMidBody):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes; send fewer or smaller files", "PayloadTooLarge")


class BodySizeLimit:
    """Limit by path prefix: checks Content-Length up front and counts streamed (chunked) bytes too.

    A chunked body is only found too large while the app reads it; the app's answer to the cut-off
    read is then replaced by the 413 (`run_refusing_mid_body`).
    """

    def __init__(self, app, limits: dict[str, int], default: int):
        self.app = app
        self.limits = sorted(limits.items(), key=lambda item: -len(item[0]))
        self.default = default

    def _limit(self, path: str) -> int:
        return next((limit for prefix, limit in self.limits if path.startswith(prefix)), self.default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await BodyTooLarge(limit).answer(scope, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await run_refusing_mid_body(self.app, scope, counting_receive, send)
