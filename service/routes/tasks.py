"""Public task routes: list, describe, predict."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service.deps import EngineDep, PredictionDep
from service.errors import PayloadTooLarge
from service.images import images_to_batch
from service.prediction_metrics import observed_prediction
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
    prediction: PredictionDep,
    top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
) -> PredictResponse:
    batcher, settings = prediction.batcher, prediction.settings
    with observed_prediction(prediction.metrics, name) as record:
        task = prediction.engine.task(name)  # this version serves the request even if replaced or removed meanwhile
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
