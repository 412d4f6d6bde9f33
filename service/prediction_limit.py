"""Sheds load at the door: past `limit` predictions in flight, a new one gets 503 + `Retry-After` at
once, before its body is read or parsed.

The batcher's queue bound only sees requests whose uploads were already received and decoded; under
a burst of hundreds of clients the cost is in receiving and parsing those bodies (memory grew by
hundreds of MB in the soak). Counting requests here, in pure ASGI, bounds that cost too.
"""

from __future__ import annotations

import re

from service.asgi import count_error, has_body, send_json_error

PREDICTION_PATH = re.compile(r"^/(tasks/[^/]+/predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
RETRY_AFTER_S = 1


class PredictionLimit:
    """At most `limit` prediction requests (either front door) inside the app at once."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.inflight = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not PREDICTION_PATH.match(scope["path"]):
            return await self.app(scope, receive, send)
        if self.inflight >= self.limit:
            count_error(scope, "Overloaded")
            metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if metrics is not None:
                metrics.rejected.labels(reason="concurrency").inc()
            detail = (
                f"server overloaded: {self.inflight} predictions in flight (at most {self.limit}); "
                f"retry after {RETRY_AFTER_S} s"
            )
            key = "error" if scope["path"].startswith("/v2/") else "detail"
            headers = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            await send_json_error(send, 503, detail, headers=headers, close=has_body(scope), key=key)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
