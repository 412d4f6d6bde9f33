"""Public task routes: list, describe, predict."""

from __future__ import annotations

import bisect
from typing import Annotated

import torch
from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from mask_store import LiveTask
from service.deps import PredictionDep, RegistryDep, serving_task
from service.engine import LoadedTask
from service.errors import PayloadTooLarge
from service.images import images_to_batch
from service.prediction_metrics import observed_prediction
from service.registry import TaskRegistry
from service.schemas import FailedTask, Prediction, PredictResponse, RegisteredTask, ScoredLabel, TaskInfo

router = APIRouter(prefix="/tasks", tags=["tasks"])


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


@router.get("/{name}", response_model=TaskInfo)
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


async def _read_uploads(images: list[UploadFile], max_images: int, max_bytes: int) -> list[tuple[str, bytes]]:
    if len(images) > max_images:
        raise PayloadTooLarge(f"{len(images)} images in one request; at most {max_images} allowed")
    blobs = []
    for index, upload in enumerate(images):
        name = upload.filename or f"images[{index}]"
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"{name}: larger than {max_bytes} bytes")
        blobs.append((name, data))
    return blobs


def _predictions(probabilities: torch.Tensor, labels: tuple[str, ...], top_k: int) -> list[Prediction]:
    k = min(top_k, len(labels))
    scores, indices = probabilities.topk(k, dim=1)
    results = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        ranked = [ScoredLabel(label=labels[i], index=i, score=s) for s, i in zip(row_scores, row_indices, strict=True)]
        results.append(Prediction(**ranked[0].model_dump(), top_k=ranked))
    return results


@router.post("/{name}/predict", response_model=PredictResponse)
async def predict(
    name: str,
    images: Annotated[list[UploadFile], File(description="one or more image files")],
    prediction: PredictionDep,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> PredictResponse:
    batcher, settings = prediction.batcher, prediction.settings
    with observed_prediction(prediction.metrics, name) as record:
        task = await serving_task(prediction.registry, name)  # this version serves it even if replaced meanwhile
        record.task_known = True
        blobs = await _read_uploads(images, settings.max_images_per_request, settings.max_image_bytes)
        with batcher.admission(len(blobs)):  # refused before a decode is spent on it; decodes count as queued
            batch = await run_in_threadpool(images_to_batch, blobs, task.transform, settings.max_image_pixels)
        probabilities = await batcher.predict(task, batch, prediction.deadline)
        return PredictResponse(
            task=task.manifest.task,
            version=task.manifest.version,
            predictions=_predictions(probabilities, task.manifest.labels, top_k),
        )
