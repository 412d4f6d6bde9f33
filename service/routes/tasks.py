"""Public task routes: list, describe, predict."""

from __future__ import annotations

import bisect
import re
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from mask_store import LiveTask
from service.deps import DataPlaneDep, DeadlineDep, RegistryDep
from service.engine import LoadedTask
from service.inference import DataPlane, EncodedImages
from service.protocols import Protocol
from service.registry import TaskRegistry
from service.schemas import FailedTask, Prediction, PredictResponse, RegisteredTask, ScoredLabel, TaskInfo

PROTOCOL = Protocol(
    name="tasks",
    prefix="/tasks",
    error_key="detail",
    prediction=re.compile(r"^/tasks/(?P<task>[^/]+)/predict$"),
    task_route=re.compile(r"^/tasks/(?P<task>[^/]+)/"),
)
router = APIRouter(prefix="/tasks", tags=["tasks"], responses=PROTOCOL.errors(503))


MAX_PAGE = 1000


@router.get("", response_model=list[TaskInfo | RegisteredTask | FailedTask])
def list_tasks(
    registry: RegistryDep,
    response: Response,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="tasks per page")] = MAX_PAGE,
    after: Annotated[str | None, Query(description="the last name of the previous page")] = None,
) -> list[TaskInfo | RegisteredTask | FailedTask]:
    """Stored tasks by name, a page at a time: resident ones described in full, cold ones by version and
    identity, failed ones with the reason. `X-Total-Count` says how many there are, and
    `Link: <...>; rel="next"` names the next page."""
    registered = registry.registered()
    failed = dict(registry.failed)
    names = sorted({*registered, *failed})
    start = bisect.bisect_right(names, after) if after is not None else 0
    page = names[start : start + limit]
    response.headers["X-Total-Count"] = str(len(names))
    if start + limit < len(names):
        following = request.url.include_query_params(limit=limit, after=page[-1])
        response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return [_listed(registry, name, registered.get(name), failed.get(name)) for name in page]


def _listed(
    registry: TaskRegistry, name: str, live: LiveTask | None, failure: str | None
) -> TaskInfo | RegisteredTask | FailedTask:
    resident = registry.resident_task(name)
    if resident is not None:
        return _describe(registry, resident)
    if failure is not None or live is None:
        return FailedTask(name=name, error=failure or "not in the store's index")
    return RegisteredTask(name=name, version=live.version, identity=live.identity)


@router.get("/{name}", response_model=TaskInfo, responses=PROTOCOL.errors(404))
async def describe_task(name: str, registry: RegistryDep) -> TaskInfo:
    """A resident task as it is served; a cold one from its stored artifact, without loading it here."""
    resident = registry.resident_task(name)
    if resident is not None:
        return _describe(registry, resident)
    manifest = await run_in_threadpool(registry.stored_manifest, name)
    info = TaskInfo.from_manifest(manifest)
    info.resident = False
    return info


def _describe(registry: TaskRegistry, task: LoadedTask) -> TaskInfo:
    info = TaskInfo.from_manifest(task.manifest)
    info.weights_cached = task.identity in registry.engine.cache
    return info


async def _read_uploads(images: list[UploadFile], plane: DataPlane) -> EncodedImages:
    """The uploaded files, each read no further than one byte past the per-image limit."""
    plane.check_count(len(images))
    blobs = []
    for index, upload in enumerate(images):
        name = upload.filename or f"images[{index}]"
        data = await upload.read(plane.settings.max_image_bytes + 1)
        plane.check_size(name, len(data))
        blobs.append((name, data))
    return EncodedImages(blobs)


@router.post("/{name}/predict", response_model=PredictResponse, responses=PROTOCOL.errors(400, 404, 408, 413, 415, 504))
async def predict(
    name: str,
    images: Annotated[list[UploadFile], File(description="one or more image files")],
    plane: DataPlaneDep,
    deadline: DeadlineDep,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> PredictResponse:
    answer = await plane.predict(name, None, lambda task: _read_uploads(images, plane), deadline)
    predictions = []
    for ranked in answer.top_k(top_k):
        scored = [ScoredLabel(label=s.label, index=s.index, score=s.score) for s in ranked]
        predictions.append(Prediction(**scored[0].model_dump(), top_k=scored))
    return PredictResponse(task=answer.task.name, version=answer.task.version, predictions=predictions)
