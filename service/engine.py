"""The engine: one frozen backbone on the device, the registered tasks, and the per-task forward.

The backbone's maskable weights are packed once into one flat buffer (the layout of the mask bits);
a task's weights are that buffer with the task's bits applied, written to a separate buffer (cached
or per request). The forward runs the backbone module through `torch.func.functional_call` with the
task's tensors substituted, so the backbone's own tensors are never written. `functional_call`
swaps module attributes for the duration of the call, so every forward runs on the engine's single
inference thread (the batcher's executor); nothing else calls `forward_task`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from mask_store import BackboneLayout, TaskArtifact, TaskNotFound, TaskStore, build_backbone, build_transform
from mask_store.manifest import Manifest
from service.cache import TaskWeightCache
from service.kernels.select import select_mask_apply
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("piggyback.engine")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class LoadedTask:
    """A registered task, ready on the device. Requests hold a reference, so replacing it is safe."""

    manifest: Manifest
    nonzero: torch.Tensor
    negative: torch.Tensor | None
    overrides: dict[str, torch.Tensor]
    transform: object = field(repr=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.manifest.task, self.manifest.version)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.device = torch.device(settings.resolved_device())
        self.dtype = DTYPES[settings.dtype]
        backbone = build_backbone(settings.backbone, settings.weights)
        self.layout = BackboneLayout.from_model(settings.backbone, backbone)  # fingerprint of the fp32 weights
        self.backbone = backbone.to(self.device, self.dtype).eval().requires_grad_(False)
        self.flat_weights = self._pack_maskable_weights()
        self.kernel_name, self._mask_apply = select_mask_apply(self.device, settings.kernel)
        self.cache = TaskWeightCache(int(settings.cache_budget_mb * 1024 * 1024), metrics.cache_event)
        # Uncacheable task weights are written here: reused by every forward (one inference thread),
        # so budget 0 costs the apply itself, not a fresh allocation and its page faults per batch.
        self._scratch: torch.Tensor | None = None
        self.store = TaskStore(settings.store)
        self._tasks: dict[str, LoadedTask] = {}
        self._lock = threading.Lock()
        log.info(
            "backbone %s on %s (%s), %d masked weights, fingerprint %s, mask kernel %s",
            settings.backbone,
            self.device,
            settings.dtype,
            self.layout.total,
            self.layout.fingerprint[:12],
            self.kernel_name,
        )

    def _pack_maskable_weights(self) -> torch.Tensor:
        """Move the maskable weights into one flat buffer (same values; modules keep views into it)."""
        flat = torch.cat([self.backbone.get_submodule(n).weight.detach().reshape(-1) for n in self.layout.names])
        for name, offset, numel, shape in zip(
            self.layout.names, self.layout.offsets, self.layout.numels, self.layout.shapes, strict=True
        ):
            module = self.backbone.get_submodule(name)
            module.weight = torch.nn.Parameter(flat[offset : offset + numel].view(shape), requires_grad=False)
        return flat

    # --- task registry -------------------------------------------------------------------------
    def load_store(self) -> None:
        """Activate the latest version of every stored task; a broken one is logged and skipped."""
        for name in self.store.names():
            try:
                artifact = self.store.get(name)
                artifact.check_backbone(self.layout)
                self.activate(artifact)
            except Exception as exc:  # one bad task must not keep the others from serving
                log.error("skipping stored task %s: %s", name, exc)

    def activate(self, artifact: TaskArtifact) -> LoadedTask:
        """Make a validated artifact live, replacing any older version atomically."""
        to_device = {"device": self.device}
        planes = artifact.plane_tensors()
        task = LoadedTask(
            manifest=artifact.manifest,
            nonzero=planes[0].to(**to_device),
            negative=planes[1].to(**to_device) if len(planes) > 1 else None,
            overrides={
                name: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                for name, t in artifact.task_tensors.items()
            },
            transform=build_transform(artifact.manifest.preprocess),
        )
        with self._lock:
            self._tasks[task.manifest.task] = task
            self.metrics.registered_tasks.set(len(self._tasks))
        self.cache.discard(lambda key: key[0] == task.manifest.task and key != task.key)
        return task

    def register(self, data: bytes) -> LoadedTask:
        """Validate against this backbone, store durably, then activate. Nothing changes on refusal."""
        artifact = self.store.put(data, self.layout)
        return self.activate(artifact)

    def unregister(self, name: str) -> None:
        """Remove from the store and from serving; requests already holding the task still finish."""
        self.store.delete(name)
        with self._lock:
            self._tasks.pop(name, None)
            self.metrics.registered_tasks.set(len(self._tasks))
        self.cache.discard(lambda key: key[0] == name)
        self.metrics.forget_task(name)

    def task(self, name: str) -> LoadedTask:
        with self._lock:
            task = self._tasks.get(name)
        if task is None:
            raise TaskNotFound(f"no task named {name!r}; GET /tasks lists the registered ones")
        return task

    def tasks(self) -> list[LoadedTask]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.manifest.task)

    # --- inference (inference thread only) -------------------------------------------------------
    def task_weights(self, task: LoadedTask) -> torch.Tensor:
        """The task's masked flat weight buffer, from the cache or freshly applied."""

        def apply() -> torch.Tensor:
            started = time.perf_counter()
            nbytes = self.flat_weights.numel() * self.flat_weights.element_size()
            if self.cache.will_keep(nbytes):
                out = torch.empty_like(self.flat_weights)
            else:
                if self._scratch is None:
                    self._scratch = torch.empty_like(self.flat_weights)
                out = self._scratch
            self._mask_apply(self.flat_weights, task.nonzero, task.negative, out)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.metrics.mask_apply.labels(kernel=self.kernel_name).observe(time.perf_counter() - started)
            return out

        return self.cache.get_or_create(task.key, apply)

    def task_parameters(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        """Every tensor the task substitutes: masked weights (views into its buffer), head, BN, fine-tuned."""
        buffer = self.task_weights(task)
        params = {
            f"{layer.name}.weight": buffer[layer.bit_offset : layer.bit_offset + layer.numel].view(layer.shape)
            for layer in task.manifest.layers
        }
        params.update(task.overrides)
        return params

    @torch.inference_mode()
    def forward_task(self, task: LoadedTask, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, num_labels] for a batch of preprocessed images."""
        params = self.task_parameters(task)
        started = time.perf_counter()
        logits = functional_call(self.backbone, params, (images.to(self.device, self.dtype),))
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        self.metrics.forward.labels(task=task.manifest.task).observe(time.perf_counter() - started)
        return probabilities

    def warm_up(self) -> None:
        for task in self.tasks():
            size = task.manifest.preprocess.size
            self.forward_task(task, torch.zeros(1, 3, size, size))
