"""Sheds load at the door: past `limit` predictions in flight, a new one gets 503 + `Retry-After` at
once, without its body being parsed, spooled or decoded.

The batcher's queue bound only sees requests whose uploads were already received and decoded; under
a burst of hundreds of clients the cost is in receiving and parsing those bodies. Counting requests
here, in pure ASGI, bounds that cost too. A refused body is still read and dropped chunk by chunk
(up to `max_body_bytes`): an HTTP/1.1 client sends its whole body before it reads the answer, and
closing on it mid-upload turns the 503 into a connection reset on the client's side.
"""

from __future__ import annotations

import re

from service.asgi import count_error, has_body, send_json_error

PREDICTION_PATH = re.compile(r"^/(tasks/[^/]+/predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
RETRY_AFTER_S = 1


class PredictionLimit:
    """At most `limit` prediction requests (either front door) inside the app at once."""

    def __init__(self, app, limit: int, max_body_bytes: int):
        self.app = app
        self.limit = limit
        self.max_body_bytes = max_body_bytes
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
            drained = not has_body(scope) or await self._discard_body(receive)
            await send_json_error(send, 503, detail, headers=headers, close=not drained, key=key)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _discard_body(self, receive) -> bool:
        """Read and drop the request body; False when the client left or it exceeds `max_body_bytes`."""
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return False
            if not message.get("more_body", False):
                return True
