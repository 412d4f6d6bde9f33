"""Keeps this process serving what the shared store names, whichever process changed it.

A daemon thread calls `TaskRegistry.sync_with_store` every `PIGGYBACK_STORE_POLL_S`: one cheap read of the
store index's tag when nothing changed. Errors (a store that is briefly unreachable) are logged and
counted, and shown by `/readyz` as `store_problem` until a poll succeeds; the replica keeps serving
what it has (it stays ready) and tries again at the next tick. Every ten minutes it also removes task
objects that no index names and that are over an hour old (`TaskStore.sweep_unnamed`), and every minute
(and when it stops) records which tasks this replica used most recently, for the next start-up to load.
"""

from __future__ import annotations

import logging
import threading
import time

from service.registry import TaskRegistry

log = logging.getLogger("piggyback.store_watcher")
SWEEP_EVERY_S = 600
RECORD_RECENT_EVERY_S = 60
UNNAMED_GRACE_S = 3600  # a publish follows its object write within seconds: an hour-old unnamed one is a leftover


class StoreWatcher:
    def __init__(self, registry: TaskRegistry, interval_s: float):
        self.registry = registry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._recent_problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._record_recent()

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        next_record = time.monotonic() + RECORD_RECENT_EVERY_S
        while not self._stop.wait(self.interval_s):
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY_S
                self._sweep()
            if time.monotonic() >= next_record:
                next_record = time.monotonic() + RECORD_RECENT_EVERY_S
                self._record_recent()
            try:
                self.registry.sync_with_store()
                self.registry.store_problem = None
            except Exception as exc:  # the watcher must outlive any one bad poll
                self.registry.metrics.store_sync_errors.labels(kind=type(exc).__name__).inc()
                if self.registry.store_problem != str(exc):  # logged once per problem, counted every poll
                    log.warning("store poll failed, serving what this replica has: %s", exc)
                self.registry.store_problem = str(exc)

    def _record_recent(self) -> None:
        try:
            self.registry.remember_recent()
            self._recent_problem = None
        except Exception as exc:  # a read-only store: the next start-up loads only the pinned tasks
            self.registry.metrics.store_sync_errors.labels(kind=f"recent:{type(exc).__name__}").inc()
            if self._recent_problem != str(exc):  # logged once per problem, counted every time
                log.warning("could not record the recently used tasks in the store: %s", exc)
            self._recent_problem = str(exc)

    def _sweep(self) -> None:
        """Objects a writer left unnamed (killed before publishing) go after a grace period; any replica
        may do it, and two doing it at once is harmless."""
        try:
            self.registry.store.sweep_unnamed(UNNAMED_GRACE_S)
        except Exception as exc:  # a read-only store, say: the objects stay, serving goes on
            self.registry.metrics.store_sync_errors.labels(kind=f"sweep:{type(exc).__name__}").inc()
            log.warning("could not sweep unnamed objects from the store: %s", exc)
