"""Graceful drain on SIGTERM: refuse new predictions, let admitted ones finish, then let the server exit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import Overloaded


class Drain:
    """Counts admitted predictions; after `begin()` new ones raise `Overloaded` (503 + Retry-After)."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0

    def begin(self) -> None:
        self.draining = True

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.draining:
            raise Overloaded("server is shutting down; retry on another replica")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """True once no admitted prediction is left, False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True
