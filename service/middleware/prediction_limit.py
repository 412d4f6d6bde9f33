"""Sheds load at the door: at most `limit` predictions in flight, counted from the moment a request's
body is complete; past the limit a new one gets 503 + `Retry-After` at once, without its body being
parsed, spooled or decoded.

The batcher's queue bound only sees requests whose uploads were already received and decoded; under
a burst of hundreds of clients the cost is in receiving and parsing those bodies. Counting requests
here, in pure ASGI, bounds that cost too.

A request takes its slot when the last byte of its body arrives, not when its headers do: a client
that trickles its upload (or sends nothing) holds no slot, so slow connections cannot starve the
others (`BodyDeadline` cuts them off). Bodies still arriving are bounded on their own, at
`max_receiving`; a request that completes its body while every slot is taken gets the same 503.
A refused body is still read and dropped chunk by chunk (up to `max_body_bytes`): an HTTP/1.1 client
sends its whole body before it reads the answer, and closing on it mid-upload turns the 503 into a
connection reset on the client's side.
"""

from __future__ import annotations

from service.errors import RETRY_AFTER_S
from service.middleware.answers import RefusedMidBody, count_error, has_body, run_refusing_mid_body, send_json_error
from service.protocols import error_key_for, is_prediction

RETRY_AFTER = [(b"retry-after", str(RETRY_AFTER_S).encode())]


def _count_rejection(scope) -> None:
    count_error(scope, "Overloaded")
    metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(reason="concurrency").inc()


def _draining(scope) -> bool:
    drain = getattr(getattr(scope.get("app"), "state", None), "drain", None)
    return drain is not None and drain.draining


class PredictionLimit:
    """At most `limit` prediction requests (either front door) past their body inside the app at once,
    and at most `max_receiving` still receiving theirs."""

    def __init__(self, app, limit: int, max_body_bytes: int, max_receiving: int):
        self.app = app
        self.limit = limit
        self.max_body_bytes = max_body_bytes
        self.max_receiving = max_receiving
        self.inflight = 0  # one event loop: no lock needed
        self.receiving = 0

    def _overloaded(self) -> str:
        return (
            f"server overloaded: {self.inflight} predictions in flight (at most {self.limit}) and {self.receiving} "
            f"uploads arriving (at most {self.max_receiving}); retry after {RETRY_AFTER_S} s"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_prediction(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        if _draining(scope):
            detail = "server is shutting down; retry on another replica"
            return await self._shed(scope, receive, send, detail)
        if self.inflight >= self.limit or self.receiving >= self.max_receiving:
            _count_rejection(scope)
            return await self._shed(scope, receive, send, self._overloaded())
        state = "receiving"  # then "holding" a slot once the body is complete, or "done" without one
        self.receiving += 1

        async def receive_then_hold():
            nonlocal state
            message = await receive()
            if state != "receiving" or (message["type"] == "http.request" and message.get("more_body", False)):
                return message
            self.receiving -= 1
            state = "done"
            if message["type"] == "http.request":  # the last of the body: take a slot, or refuse
                if self.inflight >= self.limit:
                    _count_rejection(scope)
                    raise RefusedMidBody(503, self._overloaded(), "Overloaded", RETRY_AFTER, close=False)
                self.inflight += 1
                state = "holding"
            return message

        try:
            await run_refusing_mid_body(self.app, scope, receive_then_hold, send)
        finally:
            if state == "receiving":
                self.receiving -= 1
            elif state == "holding":
                self.inflight -= 1

    async def _shed(self, scope, receive, send, detail: str) -> None:
        drained = not has_body(scope) or await self._discard_body(receive)
        key = error_key_for(scope["path"])
        await send_json_error(send, 503, detail, headers=RETRY_AFTER, close=not drained, key=key)

    async def _discard_body(self, receive) -> bool:
        """Read and drop the request body; False when the client left or it exceeds `max_body_bytes`."""
        seen = 0
        while True:
            try:
                message = await receive()
            except RefusedMidBody:  # too slow (BodyDeadline): answered by the middleware that refused it
                return False
            if message["type"] == "http.disconnect":
                return False
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return False
            if not message.get("more_body", False):
                return True
