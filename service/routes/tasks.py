"""Public task routes: list, describe, predict."""

from __future__ import annotations

import time
from typing import Annotated

import torch
from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service.deps import BatcherDep, EngineDep, MetricsDep, SettingsDep
from service.errors import PayloadTooLarge, status_for
from service.images import images_to_batch
from service.metrics import UNKNOWN_TASK
from service.schemas import FailedTask, Prediction, PredictResponse, ScoredLabel, TaskInfo

router = APIRouter(prefix="/tasks", tags=["tasks"])


@router.get("", response_model=list[TaskInfo | FailedTask])
def list_tasks(engine: EngineDep) -> list[TaskInfo | FailedTask]:
    """Served tasks, then stored tasks this replica could not load (with the reason)."""
    serving = [TaskInfo.from_manifest(task.manifest) for task in engine.tasks()]
    served = {info.name for info in serving}
    failed = [FailedTask(name=name, error=why) for name, why in sorted(engine.failed.items()) if name not in served]
    return [*serving, *failed]


@router.get("/{name}", response_model=TaskInfo)
def describe_task(name: str, engine: EngineDep) -> TaskInfo:
    return TaskInfo.from_manifest(engine.task(name).manifest)


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
    engine: EngineDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> PredictResponse:
    started = time.perf_counter()
    task, status = None, 500
    metrics.inflight.inc()
    try:
        task = engine.task(name)  # the request keeps this version even if it is replaced or removed meanwhile
        blobs = await _read_uploads(images, settings.max_images_per_request, settings.max_image_bytes)
        batch = await run_in_threadpool(images_to_batch, blobs, task.transform, settings.max_image_pixels)
        probabilities = await batcher.predict(task, batch)
        response = PredictResponse(
            task=task.manifest.task,
            version=task.manifest.version,
            predictions=_predictions(probabilities, task.manifest.labels, top_k),
        )
        status = 200
        return response
    except Exception as exc:
        status = status_for(exc)
        raise
    finally:
        metrics.inflight.dec()
        label = name if task is not None else UNKNOWN_TASK  # unknown names never create a series
        metrics.request_latency.labels(task=label, status=str(status)).observe(time.perf_counter() - started)
