"""When a request reached the app: its deadline and its body bound count from there."""

from __future__ import annotations

import time


class StampArrival:
    """ASGI middleware: records when a request reached the app, so its deadline also covers the upload
    and the multipart parsing that happen before any dependency runs."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrived"] = time.monotonic()
        await self.app(scope, receive, send)
