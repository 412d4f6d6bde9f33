"""`create_app(settings)`: the FastAPI application. Nothing heavy happens at import time.

Start-up loads the backbone and every stored task in a background thread, so /healthz answers at
once and /readyz turns 200 only when the backbone is on the device, the store is read and every
task has run one warm-up forward.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.batcher import Batcher
from service.engine import Engine
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.metrics import Metrics
from service.replica import ReplicaHeader, replica_name
from service.routes import admin, health, tasks
from service.settings import Settings

log = logging.getLogger("piggyback.service")


def _load_engine(settings: Settings, metrics: Metrics) -> Engine:
    engine = Engine(settings, metrics)
    engine.load_store()
    if settings.warmup:
        engine.warm_up()
    return engine


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    if state.settings.admin_token is None:
        log.warning("PIGGYBACK_ADMIN_TOKEN is not set: the /admin routes refuse every request")
    state.batcher = None

    async def start() -> None:
        try:
            engine = await asyncio.get_running_loop().run_in_executor(None, _load_engine, state.settings, state.metrics)
        except Exception as exc:  # surfaced by /readyz and every route instead of a silent crash loop
            log.exception("start-up failed")
            state.startup_error = f"start-up failed: {exc}"
            return
        state.batcher = Batcher(engine, state.settings.max_batch_size, state.settings.max_batch_delay_ms / 1000)
        state.batcher.start()
        state.engine = engine
        state.ready.set()
        log.info("ready: %d tasks (%s)", len(engine.tasks()), ", ".join(t.manifest.task for t in engine.tasks()))

    starter = asyncio.create_task(start())
    try:
        yield
    finally:
        await starter
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
    app.state.engine = None
    install_error_handlers(app)
    app.include_router(tasks.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_middleware(
        BodySizeLimit, limits={"/admin/": settings.max_artifact_bytes + 1024 * 1024}, default=settings.max_request_bytes
    )
    app.state.replica = replica_name(settings.replica_id)
    app.add_middleware(ReplicaHeader, replica=app.state.replica)  # outermost: even a 413 names its replica
    return app
