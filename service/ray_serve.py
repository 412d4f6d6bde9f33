"""The same service on Ray Serve: replicas across nodes, routing by task, health, overload, metrics.

The only module that imports ray (`pip install -e '.[ray]'`); `python -m service` never loads it.
Two deployments make one Serve application:

- `PiggybackReplica`: one backbone per replica process. Its ASGI ingress is the unchanged
  `create_app(settings)`, so every route, error and limit is the single-process one.
- `TaskRouter`: the application's HTTP ingress. It forwards each request as-is to some replica; for
  `/tasks/{name}/...` it names the task as the Serve *multiplexed model id*, so Serve prefers the
  replicas that already hold that task's materialized weights and falls back to any replica. The same
  holds for the KServe V2 routes `/v2/models/{name}/...`. Clients keep POSTing to
  `/tasks/{name}/predict` (or `/v2/models/{name}/infer`) and need to know nothing of Ray.

Metrics: each replica serves its own registry (the same metric names as `python -m service`) on a
port of its node, and announces it to a small named actor; `GET /metrics/targets` on the router
lists the live ones in Prometheus `http_sd` format, so Prometheus scrapes every replica.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import httpx
import ray
from prometheus_client import start_http_server
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mask_store import TaskNotFound
from service.app import create_app
from service.errors import NotReady
from service.settings import Settings

# the task a request is for: our own routes and the Open Inference Protocol's per-model routes
TASK_PATH = re.compile(r"^/(?:tasks|v2/models)/([^/]+)/")
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
METRICS_TARGETS_ACTOR = "piggyback-metrics-targets"
NAMESPACE = "piggyback"
RETRY_AFTER_S = "1"


@ray.remote(num_cpus=0)
class MetricsTargets:
    """Where each replica serves its metrics: `{replica id: "host:port"}`, one per cluster."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def add(self, replica: str, address: str) -> None:
        self.targets[replica] = address

    def remove(self, replica: str) -> None:
        self.targets.pop(replica, None)

    def all(self) -> dict[str, str]:
        return dict(self.targets)


def _metrics_targets() -> Any:
    return MetricsTargets.options(
        name=METRICS_TARGETS_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


@serve.deployment(name="PiggybackReplica", health_check_period_s=2, health_check_timeout_s=60)
@serve.ingress()
class PiggybackReplica:
    """One backbone and the unchanged FastAPI app; `forward` runs a request the router hands over."""

    async def __init__(self, settings: Settings) -> None:
        self.service = create_app(settings)
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.service), base_url="http://replica")

        # Serve's per-replica LRU of "loaded models" is what the router's task routing reads.
        async def hold(task: str) -> str:  # a plain function: Serve keeps its LRU on the function object
            return await self._task(task)

        self._hold_task = serve.multiplexed(max_num_models_per_replica=settings.ray_tasks_per_replica)(hold)
        node = ray.util.get_node_ip_address()
        self._metrics_server, _ = start_http_server(0, addr=node, registry=self.service.state.metrics.registry)
        self._targets = _metrics_targets()
        await self._targets.add.remote(self.service.state.replica, f"{node}:{self._metrics_server.server_port}")

    def __serve_build_asgi_app__(self) -> Starlette:
        return self.service

    async def _task(self, name: str) -> str:
        """Holding a task = it is registered here; its weights are materialized by its first batch."""
        engine = self.service.state.engine
        if engine is None:
            raise NotReady("replica still loading")
        return engine.task(name).manifest.task

    async def forward(self, request: dict) -> dict:
        """Serve one HTTP request (as sent by `TaskRouter`) through this replica's app."""
        task = serve.get_multiplexed_model_id()
        if task:
            try:
                await self._hold_task(task)
            except (TaskNotFound, NotReady):
                pass  # not held here; the app itself answers 404 or 503
        response = await self._client.request(
            request["method"], request["url"], headers=request["headers"], content=request["body"]
        )
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return {"status": response.status_code, "headers": headers, "body": response.content}

    async def check_health(self) -> None:
        """Serve's health check = `/readyz`: healthy once loaded; a failed start-up gets the replica replaced."""
        state = self.service.state
        while not state.ready.is_set() and state.startup_error is None:
            await asyncio.sleep(0.1)  # the first check waits for the load, so no request meets a cold replica
        if state.startup_error is not None:
            raise RuntimeError(state.startup_error)


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


@serve.deployment(name="TaskRouter", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class TaskRouter:
    """HTTP ingress: forwards every request to a replica, naming the task for cache-local routing.

    A plain `__call__` deployment, not a second `@serve.ingress` (Serve allows one per application).
    """

    def __init__(self, replicas: DeploymentHandle, routing: bool = True) -> None:
        self.replicas = replicas.options(method_name="forward")
        self.routing = routing

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/metrics/targets" and request.method == "GET":
            return await self.metrics_targets()
        return await self.forward(request)

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        url = path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        payload = {"method": request.method, "url": url, "headers": headers, "body": await request.body()}
        handle = self.replicas
        if self.routing and (match := TASK_PATH.match(path)):
            handle = handle.options(multiplexed_model_id=match.group(1))
        try:
            reply = await handle.remote(payload)
        except BackPressureError:
            return _unavailable("every replica is at max_ongoing_requests and the queue is full; retry shortly")
        except RayActorError as exc:
            return _unavailable(f"the replica serving this request was lost ({type(exc).__name__}); retry")
        response = Response(content=reply["body"], status_code=reply["status"])
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply["headers"]]
        response.headers["content-length"] = str(len(reply["body"]))
        return response

    async def metrics_targets(self) -> JSONResponse:
        """Prometheus `http_sd_configs` target list: every replica whose metrics port answers."""
        targets = await _metrics_targets().all.remote()
        live = await asyncio.gather(*(asyncio.to_thread(_reachable, a) for a in targets.values()))
        return JSONResponse(
            [
                {"targets": [address], "labels": {"replica": replica}}
                for (replica, address), ok in zip(targets.items(), live, strict=True)
                if ok
            ]
        )


def _gpus_per_replica(settings: Settings) -> float:
    if settings.device == "cuda":
        return 1
    if settings.device == "auto" and ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return 0


def application(settings: Settings, routing: bool = True) -> serve.Application:
    """The Serve application: router + replicas, sized and bounded by `settings`."""
    replicas = PiggybackReplica.options(
        max_ongoing_requests=settings.ray_max_ongoing_requests,
        max_queued_requests=settings.ray_max_queued_requests,
        ray_actor_options={"num_cpus": settings.ray_num_cpus, "num_gpus": _gpus_per_replica(settings)},
    ).bind(settings)
    return TaskRouter.bind(replicas, routing)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve config `import_path: service.ray_serve:build_app`; settings from `PIGGYBACK_*` (runtime_env).

    `args.routing: false` turns task routing off (any replica for any task), for comparison.
    """
    routing = str(args.get("routing", True)).lower() not in {"false", "0", "no"}
    return application(Settings(), routing=routing)
