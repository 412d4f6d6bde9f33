"""The engine: one frozen backbone on the device, the task-weight buffers and cache, and the forwards.

The backbone's maskable weights are packed once into one flat buffer (the layout of the mask bits);
a task's weights are that buffer with the task's bits applied, written to a separate buffer (cached
or per request). The forward runs the backbone module with the task's tensors substituted
(`service.tensor_swap`), so the backbone's own tensors are never written. The substitution
displaces module tensors for the duration of the forward, so forwards are serialised by one lock: request
batches run on the batcher's inference thread; a registration's or a load's proof forward takes the
same lock. Images of several tasks can share one forward (`forward_mixed`, `service.mixed_forward`).

Which tasks are served, and which are resident, is the registry's business (`service.registry`): it
hands the engine artifacts to `prepare` and tells it which tasks it `retire`d.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
from PIL import Image

from mask_store import BackboneLayout, CorruptArtifact, TaskArtifact, artifact_identity, build_backbone, build_transform
from mask_store.manifest import Manifest
from service.cache import TaskWeightCache
from service.kernels.select import select_mask_apply
from service.metrics import Metrics
from service.mixed_forward import MixedBatch, MixedForward
from service.settings import Settings
from service.tensor_swap import TensorSlots

log = logging.getLogger("piggyback.engine")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class LoadedTask:
    """A registered task, ready on the device. Requests hold a reference, so replacing it is safe."""

    manifest: Manifest
    identity: str  # sha256 of the manifest (which binds every tensor): the cache key of this exact artifact
    nonzero: torch.Tensor
    negative: torch.Tensor | None
    overrides: dict[str, torch.Tensor]
    transform: object = field(repr=False)
    nbytes: int = 0  # device bytes of its own tensors: what it costs to keep it resident
    input_shape: tuple[int, ...] = ()  # one preprocessed image: tasks mix in a forward only with equal shapes
    mixed_bytes: int = 0  # what one of its images costs in a mixed batch's stacked tensors
    retired: bool = False  # no longer served by the registry: its weights are not cached again

    @cached_property
    def substituted_shapes(self) -> dict[str, torch.Size]:
        """Every tensor the task puts in place of the backbone's, by name: what a mixed batch stacks."""
        shapes = {f"{layer.name}.weight": torch.Size(layer.shape) for layer in self.manifest.layers}
        shapes.update({name: tensor.shape for name, tensor in self.overrides.items()})
        return shapes

    @property
    def mix_key(self) -> tuple:
        """Tasks share a mixed forward only with the same input shape and preprocessing."""
        return (self.input_shape, self.manifest.preprocess)

    @property
    def name(self) -> str:
        return self.manifest.task

    @property
    def version(self) -> int:
        return self.manifest.version


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.device = torch.device(settings.resolved_device())
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # process-wide: this process serves one backbone
        self.dtype = DTYPES[settings.dtype]
        backbone = build_backbone(settings.backbone, settings.weights)
        self.layout = BackboneLayout.from_model(settings.backbone, backbone)  # fingerprint of the fp32 weights
        self.backbone = backbone.to(self.device, self.dtype).eval().requires_grad_(False)
        self._slots = TensorSlots(self.backbone)
        self.flat_weights = self._pack_maskable_weights()
        self.mixer = MixedForward(self.backbone, int(settings.mixed_budget_mb * 1024 * 1024))
        self.kernel_name, self._mask_apply = select_mask_apply(self.device, settings.kernel)
        self.cache = TaskWeightCache(int(settings.cache_budget_mb * 1024 * 1024), metrics.cache_event)
        # Uncacheable task weights are written here: reused by every forward (forwards are serialised
        # by _forward_lock), so budget 0 costs the apply itself, not a fresh allocation per batch.
        self._scratch: torch.Tensor | None = None
        self._forward_lock = threading.Lock()  # a forward displaces module tensors: one forward at a time
        log.info(
            "backbone %s on %s (%s, %d threads), %d masked weights, fingerprint %s, mask kernel %s",
            settings.backbone,
            self.device,
            settings.dtype,
            torch.get_num_threads(),
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

    # --- tasks ---------------------------------------------------------------------------------
    def prepare(self, artifact: TaskArtifact, prove: bool = True) -> LoadedTask:
        """Put a validated artifact on the device and prove it runs; raises CorruptArtifact if it cannot.

        The proof is what a request would do: preprocess an image at the declared input, one forward,
        finite probabilities. A task that passes cannot fail every request or break the warm-up. It runs
        once, at registration: a task the store says was proved (`prove=False`) is only checked against
        this backbone, its identity having been checked by the store on load.
        """
        artifact.check_backbone(self.layout)
        planes = artifact.plane_tensors()
        manifest = artifact.manifest
        task = LoadedTask(
            manifest=manifest,
            identity=artifact_identity(manifest),
            nonzero=planes[0].to(self.device),
            negative=planes[1].to(self.device) if len(planes) > 1 else None,
            overrides={
                name: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                for name, t in artifact.task_tensors.items()
            },
            transform=build_transform(manifest.preprocess),
        )
        own = [task.nonzero, *([task.negative] if task.negative is not None else []), *task.overrides.values()]
        task.nbytes = sum(t.numel() * t.element_size() for t in own)
        task.mixed_bytes = sum(_nbytes(t) for t in (self.flat_weights, *task.overrides.values()))
        what = f"task {manifest.task} version {manifest.version}"
        try:
            probe = task.transform(Image.new("RGB", (manifest.preprocess.size, manifest.preprocess.size)))
            task.input_shape = tuple(probe.shape)
            if not prove:
                return task
            probe = torch.stack([probe, torch.randn(probe.shape, generator=torch.Generator().manual_seed(0))])
            probabilities = self.forward_task(task, probe, prove=True)
        except Exception as exc:
            raise CorruptArtifact(
                f"{what} cannot run on this {self.layout.arch} at its declared input "
                f"({manifest.preprocess.size} px): {exc}"
            ) from exc
        if probabilities.shape != (2, len(manifest.labels)) or not torch.isfinite(probabilities).all():
            raise CorruptArtifact(f"{what} gives non-finite or misshapen outputs on a test input")
        return task

    def retire(self, task: LoadedTask) -> None:
        """The registry stopped serving `task` (replaced, unloaded, unregistered): its cached weights go,
        and a forward still running for it cannot put them back (the cache admits live tasks only)."""
        task.retired = True
        self.cache.discard(lambda key: key == task.identity)

    # --- inference ---------------------------------------------------------------------------------
    def _apply_masks(self, task: LoadedTask, out: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        self._mask_apply(self.flat_weights, task.nonzero, task.negative, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.metrics.mask_apply.labels(kernel=self.kernel_name).observe(time.perf_counter() - started)
        return out

    def _scratch_buffer(self) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty_like(self.flat_weights)
        return self._scratch

    def task_weights(self, task: LoadedTask, use_cache: bool = True) -> torch.Tensor:
        """The task's masked flat weight buffer, from the cache or freshly applied.

        The cache is keyed by the artifact's identity, and only a task that is still live is admitted:
        a batch that finishes after its task was replaced or removed cannot put stale weights back.
        """
        if use_cache:
            fill = lambda out: self._apply_masks(task, out)  # noqa: E731
            cached = self.cache.get_or_fill(task.identity, self.flat_weights, fill, admit=lambda: not task.retired)
            if cached is not None:
                return cached
        return self._apply_masks(task, self._scratch_buffer())

    def task_parameters(self, task: LoadedTask, use_cache: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor the task substitutes: masked weights (views into its buffer), head, BN, fine-tuned."""
        return self._parameters_in(task, self.task_weights(task, use_cache))

    @staticmethod
    def _parameters_in(task: LoadedTask, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {
            f"{layer.name}.weight": buffer[layer.bit_offset : layer.bit_offset + layer.numel].view(layer.shape)
            for layer in task.manifest.layers
        }
        params.update(task.overrides)
        return params

    @torch.inference_mode()
    def forward_task(self, task: LoadedTask, images: torch.Tensor, prove: bool = False) -> torch.Tensor:
        """Class probabilities [N, num_labels] for a batch of preprocessed images.

        `prove`: a registration's test forward: no cache entry, no per-task metric series.
        """
        with self._forward_lock:
            params = self.task_parameters(task, use_cache=not prove)
            started = time.perf_counter()
            probabilities = torch.softmax(self._substituted_forward(params, images).float(), dim=1).cpu()
        if not prove:
            self.metrics.forward.labels(task=task.manifest.task).observe(time.perf_counter() - started)
        return probabilities

    def _substituted_forward(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        with self._slots.substituted(params) as backbone:
            return backbone(images.to(self.device, self.dtype))

    def mixed_capacity(self, tasks: list[LoadedTask]) -> int:
        """Images one mixed batch of `tasks` may hold within PIGGYBACK_MIXED_BUDGET_MB (below 2: none)."""
        return self.mixer.max_samples(max(task.mixed_bytes for task in tasks))

    @torch.inference_mode()
    def forward_mixed(self, groups: list[tuple[LoadedTask, torch.Tensor]]) -> list[torch.Tensor]:
        """Class probabilities for each group's images, every group in one forward (`service.mixed_forward`).
        Raises NotMixable when a task substitutes a module that cannot run per sample: the caller then
        runs the groups per task."""
        with self._forward_lock:
            shapes = [task.substituted_shapes for task, _ in groups]
            batch = self.mixer.prepare(shapes, [len(images) for _, images in groups])
            self._stack_tasks(batch, [task for task, _ in groups])
            started = time.perf_counter()
            logits = self.mixer.run(batch, torch.cat([images for _, images in groups]).to(self.device, self.dtype))
            probabilities = [
                torch.softmax(logits[rows, : len(task.manifest.labels)].float(), dim=1).cpu()
                for rows, (task, _) in zip(batch.rows, groups, strict=True)
            ]
        for task, _ in groups:
            self.metrics.forward.labels(task=task.manifest.task).observe(time.perf_counter() - started)
        return probabilities

    # --- for measurements: no cache, no per-task metric series ------------------------------------
    def materialized(self, task: LoadedTask) -> dict[str, torch.Tensor]:
        """The task's tensors in a fresh buffer of their own (outside the cache and its budget)."""
        with torch.inference_mode(), self._forward_lock:
            return self._parameters_in(task, self._apply_masks(task, torch.empty_like(self.flat_weights)))

    @torch.inference_mode()
    def forward_with(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Logits of `images` under tensors `params` (from `materialized`): the per-task path's forward."""
        with self._forward_lock:
            return self._substituted_forward(params, images)

    @torch.inference_mode()
    def forward_mixed_with(
        self, tasks: list[LoadedTask], params: list[dict[str, torch.Tensor]], images: list[torch.Tensor]
    ) -> torch.Tensor:
        """Logits of a mixed batch, group i being `images[i]` under `params[i]` (of `tasks[i]`): the
        mixed path's forward, stacking included."""
        with self._forward_lock:
            batch = self.mixer.prepare([t.substituted_shapes for t in tasks], [len(i) for i in images])
            self.mixer.fill_all(batch, params)
            return self.mixer.run(batch, torch.cat(images).to(self.device, self.dtype))

    def _stack_tasks(self, batch: MixedBatch, tasks: list[LoadedTask]) -> None:
        """Copy the tasks' tensors into the batch: all at once when the cache holds every task's weights
        together (checked after materializing them: an eviction meanwhile would have reused a buffer),
        else one task at a time, each right after its weights were materialized."""
        if self.cache.capacity(self.flat_weights) >= len(tasks):
            buffers = [self.task_weights(task) for task in tasks]
            if all(self.cache.holds(t.identity, b) for t, b in zip(tasks, buffers, strict=True)):
                self.mixer.fill_all(batch, [self._parameters_in(t, b) for t, b in zip(tasks, buffers, strict=True)])
                return
        for group, task in enumerate(tasks):
            self.mixer.fill(batch, group, self.task_parameters(task))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
