"""Bounds the time a request body may take to arrive, so a client trickling its upload holds nothing for long.

The bound runs from the request's arrival (stamped by `StampArrival`, outside this middleware): the
body must be complete within `PIGGYBACK_BODY_TIMEOUT_S`, and within the request's own deadline
(`PIGGYBACK_REQUEST_TIMEOUT_S`, or less with `X-Request-Timeout`). Past either the answer is 408
(the client did not send its request in time: its fault, not the server's, so not a 504), the
connection is closed and whatever the request held is freed.
Authenticated `/admin` uploads are exempt: an operator's 1 GiB artifact over a slow link is no attack,
and `AdminAuth` (outside this middleware) has refused every unauthenticated one from its headers.
"""

from __future__ import annotations

import asyncio
import math
import time

from service.deadlines import requested_timeout
from service.middleware.admin_auth import ADMIN_PREFIX
from service.middleware.answers import RefusedMidBody, has_body, run_refusing_mid_body


class BodyTimedOut(RefusedMidBody):
    pass


class BodyDeadline:
    def __init__(self, app, body_timeout_s: float, request_timeout_s: float) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.request_timeout_s = request_timeout_s

    def _exempt(self, path: str) -> bool:
        return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")

    def _refusal(self, scope) -> tuple[float, BodyTimedOut]:
        """When the body must be complete, and the answer if it is not."""
        arrived = scope.get("state", {}).get("arrived", time.monotonic())
        asked = requested_timeout(next((v for k, v in scope["headers"] if k == b"x-request-timeout"), None))
        request_s = min(self.request_timeout_s, asked or math.inf)
        if self.body_timeout_s <= request_s:
            detail = f"request body not received within {self.body_timeout_s:g} s (PIGGYBACK_BODY_TIMEOUT_S)"
            return arrived + self.body_timeout_s, BodyTimedOut(408, detail, "BodyTimeout")
        detail = f"the request's deadline of {request_s:g} s passed while its body was still arriving"
        return arrived + request_s, BodyTimedOut(408, detail, "BodyTimeout")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not has_body(scope) or self._exempt(scope["path"]):
            return await self.app(scope, receive, send)
        due, refusal = self._refusal(scope)
        complete = False

        async def timed_receive():
            nonlocal complete
            if complete:  # after the body the server only reports a disconnect: waiting for it is unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(due - time.monotonic(), 0))
            except TimeoutError:
                raise refusal from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await run_refusing_mid_body(self.app, scope, timed_receive, send)
