"""`X-Piggyback-Replica` on every response: which process answered, for debugging and load-balancer tests."""

from __future__ import annotations

import os
import socket

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "X-Piggyback-Replica"


def replica_name(configured: str | None) -> str:
    """The configured replica id, else `hostname-pid` (unique per process on a host)."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class ReplicaHeader:
    """Pure ASGI middleware (no response buffering): adds the replica header to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REPLICA_HEADER] = self.replica
            await send(message)

        await self.app(scope, receive, send_with_header)
