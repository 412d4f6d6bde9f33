"""A prediction's deadline: when its answer stops being worth computing, and whether its client is still there.

Both front doors (the `/tasks` routes and any other protocol) get one from the `DeadlineDep`
dependency and hand it to `Batcher.predict`, so queued work that expired or whose client left is
dropped before the forward in one place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request


def requested_timeout(raw: str | bytes | None) -> float | None:
    """A client's `X-Request-Timeout` in seconds when it is a finite positive number, else None (the
    route's own validation then answers a malformed one with 422)."""
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


@dataclass(frozen=True)
class Deadline:
    """`at` is a `time.monotonic()` instant; `client_gone`, if given, returns once the client disconnected."""

    at: float
    client_gone: Callable[[], Awaitable[None]] | None = None

    def remaining(self) -> float:
        return self.at - time.monotonic()


def disconnect_waiter(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns when the client closed the connection.

    Only meaningful once the body has been read (as it has when a route runs): the server then
    answers `receive()` only with `http.disconnect`.
    """

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return client_gone
