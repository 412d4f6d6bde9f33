"""The uvicorn server with a Kubernetes-style SIGTERM drain.

On SIGTERM: `/readyz` answers 503 at once and new predictions get 503 + Retry-After, while the
listener stays open (a load balancer still routing here gets an answer, not a refused
connection); predictions already admitted finish, and uvicorn closes the connections, all within
`PIGGYBACK_DRAIN_S` whatever clients do (requests unfinished by then are cancelled); the process
exits 0. A second SIGTERM, or SIGINT, exits without waiting.

A start-up that finds its settings cannot make a backbone (weights that cannot be read or downloaded)
stops the server instead: `configuration_error` says why, and `python -m service` exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("piggyback.service")
MIN_SHUTDOWN_S = 0.1  # for connections whose answer is being written as the drain ends


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task | None = None
        self.configuration_error: str | None = None
        app.state.stop_for_configuration = self._stop_for_configuration

    def _stop_for_configuration(self, problem: str) -> None:
        """Called on the event loop by the app's start-up: no retry can help, so stop rather than stay unready."""
        self.configuration_error = problem
        self.should_exit = True

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.app.state.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.app.state.drain.begin()  # signal handlers run on the main thread, which runs the loop
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        log.info("SIGTERM: draining for at most %.1f s", self.drain_s)
        drain = self.app.state.drain
        ends = time.monotonic() + self.drain_s
        if not await drain.wait_idle(self.drain_s):
            log.warning("drain time (%.1f s) over with %d predictions unfinished", self.drain_s, drain.inflight)
        # uvicorn then waits for every open connection, a client trickling its body included, unless
        # bounded: what is left of the drain time, after which unfinished requests are cancelled.
        self.config.timeout_graceful_shutdown = max(ends - time.monotonic(), MIN_SHUTDOWN_S)
        self.should_exit = True
