"""Keeps this process serving what the shared store names, whichever process changed it.

A daemon thread calls `Engine.sync_with_store` every `PIGGYBACK_STORE_POLL_S`: one cheap read of the
store index's tag when nothing changed. Errors (a store that is briefly unreachable) are logged and
counted, and shown by `/readyz` as `store_problem` until a poll succeeds; the replica keeps serving
what it has (it stays ready) and tries again at the next tick.
"""

from __future__ import annotations

import logging
import threading

from service.engine import Engine

log = logging.getLogger("piggyback.store_watcher")


class StoreWatcher:
    def __init__(self, engine: Engine, interval_s: float):
        self.engine = engine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.engine.sync_with_store()
                self.engine.store_problem = None
            except Exception as exc:  # the watcher must outlive any one bad poll
                self.engine.metrics.store_sync_errors.labels(kind=type(exc).__name__).inc()
                if self.engine.store_problem != str(exc):  # logged once per problem, counted every poll
                    log.warning("store poll failed, serving what this replica has: %s", exc)
                self.engine.store_problem = str(exc)
