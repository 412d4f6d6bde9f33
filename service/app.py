"""`create_app(settings)`: the FastAPI application. Nothing heavy happens at import time.

Start-up loads the backbone and every stored task in a background thread, so /healthz answers at
once and /readyz turns 200 only when the backbone is on the device, the store is read and every
task has run one warm-up forward. A store that cannot be read yet is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mask_store import StoreUnavailable
from service.batcher import Batcher
from service.drain import Drain
from service.engine import Engine
from service.errors import install_error_handlers
from service.inference import DataPlane
from service.metrics import Metrics
from service.middleware import install_middleware
from service.middleware.replica_header import replica_name
from service.registry import TaskRegistry
from service.routes import routers
from service.settings import Settings, backbone_load_problem
from service.store_watcher import StoreWatcher

log = logging.getLogger("piggyback.service")


STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.5, 10.0


async def _read_store_until_it_answers(engine: Engine, state) -> TaskRegistry:
    """Start-up's opening and first read of the store (every task proves itself with a forward: the
    warm-up), retried with backoff while the store is unavailable (unreachable, a missing bucket, refused
    credentials, its index damaged or missing): `/readyz` says why meanwhile, and the replica becomes
    ready once the store is repaired instead of staying unready for good while `/healthz` says ok."""
    delay = STORE_RETRY_FIRST_S
    loop = asyncio.get_running_loop()
    registry = None
    while True:
        try:
            if registry is None:  # opening an S3 store checks its bucket: a network call
                registry = await loop.run_in_executor(None, TaskRegistry.over_store_of, engine)
            await loop.run_in_executor(None, registry.sync_with_store)
            state.store_wait = None
            return registry
        except StoreUnavailable as exc:
            state.store_wait = f"waiting for the store (retry in {delay:g} s): {exc}"
            engine.metrics.store_sync_errors.labels(kind=type(exc).__name__).inc()
            log.warning("start-up: %s", state.store_wait)
            await asyncio.sleep(delay)
            delay = min(2 * delay, STORE_RETRY_MAX_S)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    if state.settings.admin_token is None:
        log.warning("PIGGYBACK_ADMIN_TOKEN is not set: the /admin routes refuse every request")
    state.batcher = None
    state.watcher = None
    state.store_wait = None

    async def start() -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, Engine, state.settings, state.metrics)
        except Exception as exc:  # the settings make no backbone (weights unreadable, not downloadable...)
            problem = backbone_load_problem(state.settings, exc)
            state.startup_error = f"start-up failed: {problem}"
            log.debug("backbone load failed", exc_info=True)
            if state.stop_for_configuration is not None:  # `python -m service`: exit non-zero, no retry helps
                state.stop_for_configuration(problem)
            else:  # Ray Serve: the failed health check replaces the replica
                log.error("start-up failed: %s", problem)
            return
        try:
            # The backbone and the libraries are loaded for good: out of the cyclic collector's sight, so its
            # full passes (while a 10,000-task index is parsed, say) scan only what requests allocate.
            gc.freeze()
            registry = await _read_store_until_it_answers(engine, state)
        except Exception as exc:  # surfaced by /readyz and every route instead of a silent crash loop
            log.exception("start-up failed")
            state.startup_error = f"start-up failed: {exc}"
            return
        settings = state.settings
        state.batcher = Batcher(
            engine,
            settings.max_batch_size,
            settings.max_batch_delay_ms / 1000,
            settings.queue_bound(),
            mixing=settings.mixed_batches,
        )
        state.batcher.start()
        try:
            await state.batcher.calibrate(registry.tasks())  # the mixed-batch cost model, before the first request
        except Exception:  # measuring failed: those shapes run per task, the server serves
            log.exception("measuring mixed batches failed")
        state.watcher = StoreWatcher(registry, settings.store_poll_s)
        state.watcher.start()
        state.engine, state.registry = engine, registry
        state.data_plane = DataPlane(registry, state.batcher, settings)
        state.ready.set()
        log.info("ready: %d tasks registered, %d resident", len(registry.registered()), len(registry.tasks()))
        for name, reason in registry.failed.items():
            log.error("not serving task %s: %s", name, reason)

    starter = asyncio.create_task(start())
    try:
        yield
    finally:
        if state.store_wait is not None:  # shutting down while the store never answered: stop waiting
            starter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starter
        if state.watcher is not None:
            state.watcher.stop()
        if state.batcher is not None:
            await state.batcher.stop()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Piggyback Serve",
        description="Many classification tasks over one frozen backbone, each a 1-bit mask over its weights.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = threading.Event()
    app.state.startup_error = None
    app.state.stop_for_configuration = None  # set by the server that runs the app (`service.server`)
    app.state.engine = None
    app.state.registry = None
    app.state.drain = Drain()
    install_error_handlers(app)
    for router in routers():  # every module of service/routes: a new front door is one new module there
        app.include_router(router)
    app.state.replica = replica_name(settings.replica_id)
    install_middleware(app, settings)
    return app
