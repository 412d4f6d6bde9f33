"""ASGI middleware that refuses oversized request bodies with 413 before they are parsed or spooled."""

from __future__ import annotations

from service.asgi import count_error, send_json_error


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Limit by path prefix: checks Content-Length up front and counts streamed (chunked) bytes too.

    A chunked body is only found too large while the app reads it, and whatever the app makes of the
    cut-off read (FastAPI's form parsing answers 400 "error parsing the body") is replaced by the 413.
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
            return await self._refuse(scope, send, limit, self._error_key(scope["path"]))
        received = 0
        started = False  # a response has begun (the app's, or our 413)
        too_large = False  # the body overflowed before any response began: the answer is our 413

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = too_large or not started
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:  # the app's answer to a cut-off body: replaced by the 413, sent once
                if not started:
                    started = True
                    await self._refuse(scope, send, limit, self._error_key(scope["path"]))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                started = True
                await self._refuse(scope, send, limit, self._error_key(scope["path"]))

    def _error_key(self, path: str) -> str:
        return next((key for prefix, key in self.error_keys.items() if path.startswith(prefix)), "detail")

    @staticmethod
    async def _refuse(scope, send, limit: int, key: str) -> None:
        count_error(scope, "PayloadTooLarge")
        detail = f"request body larger than {limit} bytes; send fewer or smaller files"
        await send_json_error(send, 413, detail, close=True, key=key)
