"""The same service on Ray Serve: replicas across nodes, routing by task, health, overload, metrics.

The only module that imports ray (`pip install -e '.[ray]'`); `python -m service` never loads it.
Two deployments make one Serve application:

- `PiggybackReplica`: one backbone per replica process. Its ASGI ingress is the unchanged
  `create_app(settings)`, so every route, error and limit is the single-process one.
- `TaskRouter`: the application's HTTP ingress. From the headers alone, before any of the body is read,
  it refuses what the single-process app refuses at its door: /admin without the token (401/403), a
  declared body over the size limits (413), more than `ray_router_max_inflight` requests at once
  (503 + Retry-After); a chunked body is counted while read and cut off at the limit. It forwards the
  rest to some replica; for
  `/tasks/{name}/...` it names the task as the Serve *multiplexed model id*, so Serve prefers the
  replicas where that task is resident and falls back to any replica. The same
  holds for the KServe V2 routes `/v2/models/{name}/...`. Clients keep POSTing to
  `/tasks/{name}/predict` (or `/v2/models/{name}/infer`) and need to know nothing of Ray.

Task routing follows the registry's resident set (`ResidentRouting`): Serve's multiplexed set of a
replica has no count of its own; a task enters it with its first request there (or its preload) and
leaves it when the registry unloads it (PIGGYBACK_RESIDENT_BUDGET_MB, an unregistration).

Deadlines: a prediction's deadline runs from its arrival at the router, not at the replica. The router
sends the absolute deadline (wall clock, so nodes' clocks must agree, as NTP keeps them) with the
request; the replica answers 504 if it passed while the request was queued in Ray, and otherwise hands
the app the time left as `X-Request-Timeout`.

Metrics: each replica serves its own registry (the same metric names as `python -m service`) on a
port of its node, and announces it to a small named actor; `GET /metrics/targets` on the router
lists the live ones in Prometheus `http_sd` format, so Prometheus scrapes every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections import deque
from typing import Any

import httpx
import ray
from prometheus_client import Gauge, start_http_server
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from mask_store import TaskNotFound
from service.app import create_app
from service.deadlines import requested_timeout
from service.errors import RETRY_AFTER_S, NotReady
from service.inference import serving_task
from service.middleware.admin_auth import ADMIN_PREFIX, admin_refusal
from service.protocols import error_key_for, is_prediction, task_of
from service.registry import TaskRegistry
from service.settings import Settings

log = logging.getLogger("piggyback.ray")

HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
METRICS_TARGETS_ACTOR = "piggyback-metrics-targets"
NAMESPACE = "piggyback"
ADMIN_BODY_SLACK = 1024 * 1024  # as in the app: room for the multipart framing around an artifact
# Serve's own bound on the router's requests sits above our cap, so that past the cap the client gets
# the router's quick 503 rather than a request parked in the proxy's queue.
ROUTER_ONGOING_MARGIN = 64


@ray.remote(num_cpus=0)
class MetricsTargets:
    """Where each replica serves its metrics: `{replica id: "host:port"}`, one per cluster."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def add(self, replica: str, address: str) -> None:
        self.targets[replica] = address

    def remove(self, replica: str, address: str) -> None:
        """Drop `replica` if it is still at `address` (it may have announced itself again since)."""
        if self.targets.get(replica) == address:
            del self.targets[replica]

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
        if "PIGGYBACK_RAY_TASKS_PER_REPLICA" in os.environ:
            log.warning("PIGGYBACK_RAY_TASKS_PER_REPLICA is ignored: PIGGYBACK_RESIDENT_BUDGET_MB bounds what is held")
        self._routing = ResidentRouting(self._task, self.service.state.metrics.registry)
        node = ray.util.get_node_ip_address()
        self._metrics_server, _ = start_http_server(0, addr=node, registry=self.service.state.metrics.registry)
        self._metrics_address = f"{node}:{self._metrics_server.server_port}"
        self._targets = _metrics_targets()
        await self._announce()

    async def _announce(self) -> None:
        """(Re)list this replica's metrics port: the router prunes targets it cannot reach, so a live
        replica pruned by a missed connection comes back with its next health check."""
        try:
            await self._targets.add.remote(self.service.state.replica, self._metrics_address)
        except RayActorError:
            self._targets = _metrics_targets()  # the detached actor was lost: a new one, filled by the next checks

    async def __del__(self) -> None:
        """Serve's graceful shutdown: leave the metrics targets, so Prometheus stops scraping a stopped replica."""
        with contextlib.suppress(Exception):
            await self._targets.remove.remote(self.service.state.replica, self._metrics_address)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._metrics_server.shutdown)

    def __serve_build_asgi_app__(self) -> Starlette:
        return self.service

    async def _task(self, name: str) -> str:
        """Holding a task = it is resident here (loaded now if it was not)."""
        registry = self.service.state.registry
        if registry is None:
            raise NotReady("replica still loading")
        return (await serving_task(registry, name)).manifest.task

    async def forward(self, request: dict) -> dict:
        """Serve one HTTP request (as sent by `TaskRouter`) through this replica's app."""
        task = serve.get_multiplexed_model_id()
        if task:
            try:
                await self._routing.hold(task, self.service.state.registry)
            except (TaskNotFound, NotReady):
                pass  # not held here; the app itself answers 404 or 503
        try:
            return await self._forward(request)
        finally:
            self._routing.forget_unloaded()

    async def _forward(self, request: dict) -> dict:
        headers = request["headers"]
        if request.get("deadline") is not None:
            left = request["deadline"] - time.time()
            if left <= 0:
                return _reply(504, _deadline_passed(request["url"]))
            headers = [(k, v) for k, v in headers if k != "x-request-timeout"] + [("x-request-timeout", f"{left:.6f}")]
        response = await self._client.request(
            request["method"], request["url"], headers=headers, content=request["body"]
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
        await self._routing.hold_resident(state.registry)
        await self._announce()


class ResidentRouting:
    """Serve's multiplexed set of this replica, kept equal to the registry's resident set.

    Serve's router sends a task to the replicas whose multiplexed set names it. That set is an LRU
    with a count of its own; here it has none (-1): a task enters it with its first request (or, once,
    when the replica is ready and it was preloaded) and leaves it when the registry unloads it, so
    PIGGYBACK_RESIDENT_BUDGET_MB is the one bound. Serve offers no public call to drop an id, so
    `forget_unloaded` edits its multiplex wrapper (ray[serve] is pinned; the Ray cluster test holds it).
    """

    _WRAPPER = "__serve_multiplex_wrapper"  # where Serve keeps a plain function's multiplex state

    def __init__(self, load, metrics_registry) -> None:
        async def held(task: str) -> str:  # a plain function: Serve keeps its set on the function object
            return await load(task)

        self._held_function = held
        self._hold = serve.multiplexed(max_num_models_per_replica=-1)(held)
        self._unloaded: deque[str] = deque()  # appended from any thread, drained on the event loop
        self._listening: TaskRegistry | None = None
        self._seeded = False
        self._count = Gauge(
            "piggyback_ray_routed_tasks", "tasks Serve routes to this replica (equal to its resident tasks)",
            registry=metrics_registry,
        )  # fmt: skip

    async def hold(self, task: str, registry: TaskRegistry | None) -> None:
        """Name `task` to Serve as held here, loading it first if it is not resident."""
        if registry is not None and self._listening is not registry:
            registry.on_unload(self._unloaded.append)
            self._listening = registry
        self.forget_unloaded()
        await self._hold(task)  # what its load evicted is dropped by the caller's next `forget_unloaded`

    async def hold_resident(self, registry: TaskRegistry) -> None:
        """Once ready: the tasks preloaded at start-up (pinned, recently used) are routed here too."""
        if not self._seeded:
            self._seeded = True
            for task in registry.tasks():
                with contextlib.suppress(TaskNotFound, NotReady):
                    await self.hold(task.name, registry)
        self.forget_unloaded()

    def forget_unloaded(self) -> None:
        """Drop from Serve's set the tasks the registry unloaded since, and have Serve tell its routers."""
        wrapper = getattr(self._held_function, self._WRAPPER, None)
        while self._unloaded:
            name = self._unloaded.popleft()
            if self._listening is not None and self._listening.is_resident(name):
                continue  # loaded again since
            if wrapper is not None and wrapper.models.pop(name, None) is not None:
                wrapper._push_multiplexed_replica_info = True
        self._count.set(len(wrapper.models) if wrapper is not None else 0)


def _reply(status: int, body: dict) -> dict:
    """A `forward` reply the replica makes itself, without running the app."""
    return {"status": status, "headers": [("content-type", "application/json")], "body": json.dumps(body).encode()}


def _deadline_passed(url: str) -> dict:
    return {error_key_for(url): "the request's deadline passed while it was queued in Ray; retry with more time"}


def _refuse(request: Request, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    """An answer from the router itself; closes the connection when it leaves a body unread."""
    headers = dict(headers or {})
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        headers["Connection"] = "close"
    return JSONResponse({error_key_for(request.url.path): detail}, status_code=status, headers=headers)


def _unavailable(request: Request, detail: str) -> JSONResponse:
    return _refuse(request, 503, detail, {"Retry-After": str(RETRY_AFTER_S)})


class _TooLarge(Exception):
    pass


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


@serve.deployment(name="TaskRouter", ray_actor_options={"num_cpus": 0})
class TaskRouter:
    """HTTP ingress: refuses from the headers what the app would refuse at its door, forwards the rest to
    a replica, naming the task for cache-local routing.

    A plain `__call__` deployment, not a second `@serve.ingress` (Serve allows one per application).
    Its in-flight count is per router replica; one event loop, so no lock.
    """

    def __init__(self, replicas: DeploymentHandle, settings: Settings, routing: bool = True) -> None:
        self.replicas = replicas.options(method_name="forward")
        self.settings = settings
        self.routing = routing
        self.inflight = 0

    async def __call__(self, request: Request) -> Response:
        arrived = time.time()
        if request.url.path == "/metrics/targets" and request.method == "GET":
            return await self.metrics_targets()
        cap = self.settings.ray_router_max_inflight
        if self.inflight >= cap:
            return _unavailable(
                request, f"router overloaded: {self.inflight} requests in flight (at most {cap}); retry"
            )
        self.inflight += 1
        try:
            return await self.forward(request, arrived)
        finally:
            self.inflight -= 1

    def _refusal(self, request: Request) -> JSONResponse | None:
        """The admin token and the declared body size, checked as the app's middleware checks them."""
        path = request.url.path
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            refusal = admin_refusal(self.settings.admin_token, request.headers.get("authorization"))
            if refusal is not None:
                status, detail, headers = refusal
                return _refuse(request, status, detail, {k.decode(): v.decode() for k, v in headers})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._body_limit(path):
            return self._too_large(request)
        return None

    def _body_limit(self, path: str) -> int:
        if path.startswith(ADMIN_PREFIX + "/"):
            return self.settings.max_artifact_bytes + ADMIN_BODY_SLACK
        return self.settings.max_request_bytes

    def _too_large(self, request: Request) -> JSONResponse:
        detail = f"request body larger than {self._body_limit(request.url.path)} bytes; send fewer or smaller files"
        return _refuse(request, 413, detail)

    async def _body(self, request: Request) -> bytes:
        """The body, read as it streams in and never held past the limit (a chunked one has no Content-Length)."""
        limit, size, chunks = self._body_limit(request.url.path), 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    def _deadline(self, request: Request, arrived: float) -> float | None:
        """When a prediction must be answered by (wall clock): its timeout counted from the router's arrival.

        None for other routes, and for an unreadable `X-Request-Timeout`, which the app answers with 422.
        """
        if not is_prediction(request.method, request.url.path):
            return None
        raw = request.headers.get("x-request-timeout")
        asked = requested_timeout(raw)
        if raw is not None and asked is None:
            return None
        return arrived + min(self.settings.request_timeout_s, asked or math.inf)

    async def forward(self, request: Request, arrived: float) -> Response:
        if (refusal := self._refusal(request)) is not None:
            return refusal
        path = request.url.path
        deadline = self._deadline(request, arrived)
        try:
            # the single-process bound on a body's arrival: a trickling client is cut off, not held
            body = await asyncio.wait_for(self._body(request), self.settings.body_timeout_s - (time.time() - arrived))
        except TimeoutError:
            detail = f"request body not received within {self.settings.body_timeout_s:g} s (PIGGYBACK_BODY_TIMEOUT_S)"
            return _refuse(request, 408, detail)
        except _TooLarge:
            return self._too_large(request)
        except ClientDisconnect:
            return _refuse(request, 400, "the client disconnected before sending the whole body")
        if deadline is not None and time.time() >= deadline:
            return JSONResponse(_deadline_passed(path), status_code=504)
        url = path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        payload = {"method": request.method, "url": url, "headers": headers, "body": body, "deadline": deadline}
        handle = self.replicas
        if self.routing and (task := task_of(path)) is not None:
            handle = handle.options(multiplexed_model_id=task)
        try:
            reply = await handle.remote(payload)
        except BackPressureError:
            return _unavailable(
                request, "every replica is at max_ongoing_requests and the queue is full; retry shortly"
            )
        except (RayActorError, ReplicaUnavailableError) as exc:
            return _unavailable(request, f"the replica serving this request was lost ({type(exc).__name__}); retry")
        except DeploymentUnavailableError:
            return _unavailable(request, "no replica can take requests (the deployment failed to start); retry later")
        response = Response(content=reply["body"], status_code=reply["status"])
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply["headers"]]
        response.headers["content-length"] = str(len(reply["body"]))
        return response

    async def metrics_targets(self) -> JSONResponse:
        """Prometheus `http_sd_configs` target list: every replica whose metrics port answers.

        The others are dropped from the list for good (a live one announces itself again with its next
        health check), so replicas that died without a graceful shutdown do not pile up.
        """
        actor = _metrics_targets()
        targets = await actor.all.remote()
        live = await asyncio.gather(*(asyncio.to_thread(_reachable, a) for a in targets.values()))
        await asyncio.gather(
            *(actor.remove.remote(r, a) for (r, a), ok in zip(targets.items(), live, strict=True) if not ok)
        )
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
    router = TaskRouter.options(max_ongoing_requests=settings.ray_router_max_inflight + ROUTER_ONGOING_MARGIN)
    return router.bind(replicas, settings, routing)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve config `import_path: service.ray_serve:build_app`; settings from `PIGGYBACK_*` (runtime_env).

    `args.routing: false` turns task routing off (any replica for any task), for comparison.
    """
    routing = str(args.get("routing", True)).lower() not in {"false", "0", "no"}
    return application(Settings(), routing=routing)
