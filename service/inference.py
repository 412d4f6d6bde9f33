"""The data plane: one prediction, whichever front door it came through.

A front door (`routes/tasks.py`, `routes/v2.py`) parses its protocol into `EncodedImages` or
`PreprocessedImages` and encodes the `Answer`; everything between is here, once: task lookup (the
version asked for; a cold task loaded off the event loop), the request limits and their messages,
admission (refused before a decode is spent on it), decoding in a thread, batching under the
request's deadline, and the prediction metrics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from mask_store import TaskNotFound
from service.batcher import Batcher
from service.deadlines import Deadline
from service.engine import LoadedTask
from service.errors import PayloadTooLarge
from service.images import images_to_batch
from service.prediction_metrics import observed_prediction
from service.registry import TaskRegistry
from service.settings import Settings


@dataclass(frozen=True)
class EncodedImages:
    """Image files as uploaded (PNG, JPEG, ...), each with a name for error messages."""

    blobs: list[tuple[str, bytes]]


@dataclass(frozen=True)
class PreprocessedImages:
    """Images already preprocessed as the task declares: [N, 3, S, S] float32."""

    batch: torch.Tensor


Inputs = EncodedImages | PreprocessedImages


@dataclass(frozen=True)
class ScoredLabel:
    score: float
    index: int
    label: str


@dataclass(frozen=True)
class Answer:
    task: LoadedTask  # the version that served it (a request keeps it even if it is replaced meanwhile)
    probabilities: torch.Tensor  # [N, labels]

    def top_k(self, k: int) -> list[list[ScoredLabel]]:
        """Each image's k best labels, best first (k capped at the number of labels)."""
        labels = self.task.manifest.labels
        scores, indices = self.probabilities.topk(min(k, len(labels)), dim=1)
        return [
            [ScoredLabel(s, i, labels[i]) for s, i in zip(row_scores, row_indices, strict=True)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
        ]


async def serving_task(registry: TaskRegistry, name: str, version: str | None = None) -> LoadedTask:
    """The task's live version: at once when resident, else loaded in a thread (store I/O and a proof
    forward stay off the event loop; concurrent first requests share one load). TaskNotFound if a
    `version` is asked for and it is not the one served."""
    task = registry.resident_task(name) or await run_in_threadpool(registry.task, name)
    if version is not None and version != str(task.version):
        raise TaskNotFound(f"task {name!r} has no version {version!r}; it serves version {task.version}")
    return task


class DataPlane:
    def __init__(self, registry: TaskRegistry, batcher: Batcher, settings: Settings) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.metrics = registry.metrics

    def check_count(self, count: int) -> None:
        """The images-per-request limit (413); front doors call it before reading the images."""
        if count > self.settings.max_images_per_request:
            raise PayloadTooLarge(
                f"{count} images in one request; at most {self.settings.max_images_per_request} allowed"
            )

    def check_size(self, name: str, nbytes: int) -> None:
        """The bytes-per-image limit (413)."""
        if nbytes > self.settings.max_image_bytes:
            raise PayloadTooLarge(f"{name}: larger than {self.settings.max_image_bytes} bytes")

    async def predict(
        self,
        name: str,
        version: str | None,
        read: Callable[[LoadedTask], Awaitable[Inputs]],
        deadline: Deadline | None,
    ) -> Answer:
        """Look the task up, let the front door `read` its inputs for it, check, admit, decode, batch.
        Raises the domain errors (`service.errors`) each front door words in its protocol."""
        with observed_prediction(self.metrics, name) as record:
            task = await serving_task(self.registry, name, version)
            record.task_known = True
            inputs = await read(task)
            if isinstance(inputs, EncodedImages):
                self.check_count(len(inputs.blobs))
                for blob_name, data in inputs.blobs:
                    self.check_size(blob_name, len(data))
                with self.batcher.admission(len(inputs.blobs)):  # decodes count as queued images
                    batch = await run_in_threadpool(
                        images_to_batch, inputs.blobs, task.transform, self.settings.max_image_pixels
                    )
            else:
                batch = inputs.batch
                self.check_count(len(batch))
                self.batcher.check_admission(len(batch))
            return Answer(task, await self.batcher.predict(task, batch, deadline))
