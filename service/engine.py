"""The engine: one frozen backbone on the device, the registered tasks, and the per-task forward.

The backbone's maskable weights are packed once into one flat buffer (the layout of the mask bits);
a task's weights are that buffer with the task's bits applied, written to a separate buffer (cached
or per request). The forward runs the backbone module with the task's tensors substituted
(`service.tensor_swap`), so the backbone's own tensors are never written. The substitution
displaces module tensors for the duration of the forward, so forwards are serialised by one lock: request
batches run on the batcher's inference thread; a registration's or the store watcher's proof forward
takes the same lock.

Which tasks are registered follows the store's index (`sync_with_store`), whoever changed it: this
process through `register`/`unregister`, or another replica sharing the store. Registered is not
resident: a task is loaded onto the device before use (PIGGYBACK_PRELOAD) or on its first request,
and the least recently used ones are unloaded beyond PIGGYBACK_RESIDENT_BUDGET_MB.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from PIL import Image

from mask_store import (
    BackboneLayout,
    CorruptArtifact,
    StoreUnavailable,
    TaskArtifact,
    TaskNotFound,
    TaskStore,
    artifact_identity,
    build_backbone,
    build_transform,
)
from mask_store.manifest import Manifest
from mask_store.store import IndexMissing, StoredVersion, StoreIndex
from service.cache import TaskWeightCache
from service.kernels.select import select_mask_apply
from service.metrics import Metrics
from service.mixed_forward import MixedForward
from service.settings import Settings
from service.tensor_swap import TensorSlots

log = logging.getLogger("piggyback.engine")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NEVER = object()  # no store index applied yet


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


class GenerationBehind(StoreUnavailable):
    """The store's index went back to a lower generation than this replica serves."""


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
        self.store = TaskStore(settings.store)
        # The registry. `_live`: what the store's index names (every registered task, cheap). `_tasks`: the
        # resident ones, loaded on the device, least recently used first; a cold task loads on first use.
        self._live: dict[str, tuple[int, StoredVersion]] = {}
        self._tasks: OrderedDict[str, LoadedTask] = OrderedDict()
        self._resident_budget = int(settings.resident_budget_mb * 1024 * 1024)
        self._pinned = settings.pinned()
        self._loading: dict[str, threading.Lock] = {}  # one load per task at a time; other tasks in parallel
        self.failed: dict[str, str] = {}  # task name -> why this replica does not serve it
        self._failed_versions: dict[str, tuple[int, str]] = {}  # known-bad (version, identity): not reloaded
        self._applied_tag: str | None | object = _NEVER
        self._applied_generation = -1
        self.store_problem: str | None = None  # why the last store poll failed, while it does
        self._lock = threading.Lock()  # the registry: _tasks and failed
        self._forward_lock = threading.Lock()  # a forward displaces module tensors: one forward at a time
        self._sync_lock = threading.Lock()
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

    # --- task registry -------------------------------------------------------------------------
    def prepare(self, artifact: TaskArtifact) -> LoadedTask:
        """Put a validated artifact on the device and prove it runs; raises CorruptArtifact if it cannot.

        The proof is what a request would do: preprocess an image at the declared input, one forward,
        finite probabilities. A task that passes cannot fail every request or break the warm-up.
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

    def _install(self, task: LoadedTask, allow_older: bool) -> None:
        """Make `task` live. Under the lock, a registration never replaces a higher live version;
        the store watcher may (allow_older): the store's index is the truth after an unregister."""
        with self._lock:
            current = self._tasks.get(task.name)
            if current is not None and (
                current.identity == task.identity or (not allow_older and current.version > task.version)
            ):
                return
            self._tasks[task.name] = task
            self._tasks.move_to_end(task.name)
            self.failed.pop(task.name, None)
            self._failed_versions.pop(task.name, None)
            evicted = self._evict_beyond_budget(keep=task.name)
            self._count_resident()
        for old in ([current] if current is not None else []) + evicted:
            self.cache.discard(lambda key, old=old: key == old.identity)

    def _evict_beyond_budget(self, keep: str) -> list[LoadedTask]:
        """Unload least recently used tasks (never pinned ones, nor `keep`) until the resident ones fit
        the budget; the caller holds the registry lock. Requests holding an evicted task still finish."""
        evicted, resident = [], self._resident_bytes()
        for name in list(self._tasks):
            if resident <= self._resident_budget:
                break
            if name != keep and name not in self._pinned:
                evicted.append(self._tasks.pop(name))
                resident -= evicted[-1].nbytes
                self.metrics.resident_evictions.inc()
        return evicted

    def _resident_bytes(self) -> int:
        return sum(t.nbytes for t in self._tasks.values())

    def _count_resident(self) -> None:
        self.metrics.resident_tasks.set(len(self._tasks))
        self.metrics.resident_bytes.set(self._resident_bytes())
        self.metrics.registered_tasks.set(len(self._live))

    def _deactivate(self, name: str) -> None:
        with self._lock:
            task = self._tasks.pop(name, None)
            self._live.pop(name, None)
            self.failed.pop(name, None)
            self._failed_versions.pop(name, None)
            self._loading.pop(name, None)
            self._count_resident()
        if task is not None:
            self.cache.discard(lambda key: key == task.identity)
        self.metrics.forget_task(name)

    def register(self, data: bytes) -> LoadedTask:
        """Validate, prove it runs, store durably, then activate. A refusal changes nothing; an
        activation that fails after the store took the artifact withdraws it again.

        Under the sync lock, and followed by applying the index it published: a store poll holding an
        older index can neither run meanwhile nor afterwards, so a task answered 201 here is never
        404 or an older version here afterwards.
        """
        prepared: list[LoadedTask] = []
        with self._sync_lock:
            published = self.store.publish(data, self.layout, prove=lambda a: prepared.append(self.prepare(a)))
            task = prepared[0]
            try:
                self._install(task, allow_older=False)
            except BaseException:
                log.exception("activation of %s version %d failed; withdrawing it", task.name, task.version)
                self.store.withdraw(task.name, task.version)
                raise
            self._apply_index(published.index, published.tag)
        return task

    def unregister(self, name: str) -> None:
        """Remove from the store and from serving; requests already holding the task still finish."""
        with self._sync_lock:
            index, tag = self.store.delete(name)
            self._deactivate(name)
            self._apply_index(index, tag)

    def sync_with_store(self) -> bool:
        """Serve exactly what the store's index names (changes by any process); True when fully applied.

        Cheap when nothing changed: one tag read. A task that fails to load keeps its previous version
        here (if any), is listed in `failed` (until the store no longer names it) and counted; a storage
        or I/O error is not a failure of that version: it is retried at the next call.
        """
        with self._sync_lock:
            tag = self.store.index_tag()
            if tag == self._applied_tag:
                return True
            index, tag = self.store.read_index()
            if tag is None and self._applied_generation > 0:
                raise IndexMissing(
                    f"the store index of {self.store.url} is gone (generation {self._applied_generation} was served "
                    "here): nothing is unregistered; rebuild it with POST /admin/store/rebuild-index"
                )
            return self._apply_index(index, tag)

    def _apply_index(self, index: StoreIndex, tag: str | None) -> bool:
        """Serve what `index` names (the caller holds the sync lock): its live map replaces this replica's,
        and what PIGGYBACK_PRELOAD asks for is loaded. An index at a lower generation than one applied here
        is refused (GenerationBehind): snapshots only move forward."""
        if index.generation < self._applied_generation:
            raise GenerationBehind(
                f"the store index is at generation {index.generation}, behind generation {self._applied_generation} "
                "served here: the store was reset or restored; serving what this replica has (restart it, or "
                "rebuild the index, to follow the store)"
            )
        live = {name: found for name in index.tasks if (found := index.live(name)) is not None}
        for name in set(self._live) - set(live):
            self._deactivate(name)
            log.info("task %s was unregistered in the store", name)
        with self._lock:
            self._live = live
            self._count_resident()
        complete = True
        for name in self._to_preload(live):
            if name not in self._pinned and self._resident_bytes() >= self._resident_budget:
                break  # full: the rest load on their first request
            version, entry = live[name]
            try:
                self._load(name, version, entry, keep_serving=False)
            except StoreUnavailable as exc:  # I/O (EIO, ESTALE, a lost network): never a bad task
                complete = False
                log.warning("task %s version %d: store unavailable, will retry: %s", name, version, exc)
            except TaskNotFound:
                pass  # a bad artifact: recorded in `failed`, the previous version (if any) kept
        for name in {t.name for t in self.tasks()} - set(index.tasks):  # resident, never in the index
            self._deactivate(name)
        self._forget_failures_except(set(index.tasks))
        if complete:
            self._applied_tag = tag
            self._applied_generation = index.generation
        return complete

    def load_store(self) -> None:
        """Start-up: read the index, load what PIGGYBACK_PRELOAD asks for; a bad one is listed in `failed`."""
        self.sync_with_store()

    def _record_failure(self, name: str, version: int, identity: str, exc: Exception) -> None:
        reason = f"version {version}: {exc}"
        with self._lock:
            self.failed[name] = reason
            self._failed_versions[name] = (version, identity)
        self.metrics.task_load_failures.labels(kind=type(exc).__name__).inc()
        kept = self._task_or_none(name)
        log.error("task %s %s; %s", name, reason, f"still serving version {kept.version}" if kept else "not serving it")

    def _forget_failures_except(self, stored: set[str]) -> None:
        """A failed task that the store no longer names is no longer anyone's problem: unlisted."""
        with self._lock:
            for name in set(self.failed) - stored:
                del self.failed[name]
                self._failed_versions.pop(name, None)

    def _task_or_none(self, name: str) -> LoadedTask | None:
        with self._lock:
            return self._tasks.get(name)

    def _to_preload(self, live: dict[str, tuple[int, StoredVersion]]) -> list[str]:
        """Tasks to load now rather than on first use: pinned ones first, then with PIGGYBACK_PRELOAD=all
        every other one (the caller stops at the resident budget: a long tail beyond it loads on demand)."""
        names = [n for n in live if n in self._pinned]
        if self.settings.preload == "all":
            names += [n for n in live if n not in self._pinned]
        return [
            name
            for name in names
            if self._resident_if_current(name, *live[name]) is None
            and self._failed_versions.get(name) != (live[name][0], live[name][1].identity)
        ]

    def _resident_if_current(self, name: str, version: int, entry: StoredVersion) -> LoadedTask | None:
        with self._lock:
            task = self._tasks.get(name)
            if task is None or task.version != version or entry.identity not in ("", task.identity):
                return None
            self._tasks.move_to_end(name)
            return task

    def resident_task(self, name: str) -> LoadedTask | None:
        """The task if it is resident at its live version (no I/O: safe on an event loop), else None."""
        live = self._live.get(name)
        return self._resident_if_current(name, *live) if live is not None else None

    def task(self, name: str) -> LoadedTask:
        """The live version of a registered task, loaded first if it is cold (blocking: store I/O and a
        proof forward). Concurrent first requests for one task share one load."""
        live = self._live.get(name)
        if live is None:
            raise self._not_found(name)
        return self._resident_if_current(name, *live) or self._load(name, *live)

    def _load(self, name: str, version: int, entry: StoredVersion, keep_serving: bool = True) -> LoadedTask:
        """Load the live version. When it cannot be (I/O, a bad artifact) and `keep_serving`, an older
        version still resident here is returned instead; else the error is raised."""
        with self._lock:
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:
            resident = self._resident_if_current(name, version, entry)
            if resident is not None:  # another request loaded it meanwhile
                return resident
            kept = self._task_or_none(name) if keep_serving else None  # served while the new one cannot be
            if self._failed_versions.get(name) == (version, entry.identity):
                if kept is not None:
                    return kept
                raise self._not_found(name)
            started = time.perf_counter()
            try:
                task = self.prepare(self.store.load(name, version, entry))
            except (StoreUnavailable, OSError) as exc:
                if kept is not None:
                    return kept
                raise StoreUnavailable(
                    f"task {name!r} version {version} cannot be read from the store now: {exc}"
                ) from exc
            except Exception as exc:  # an artifact that does not parse, match this backbone, or run
                self._record_failure(name, version, entry.identity, exc)
                if kept is not None:
                    return kept
                raise self._not_found(name) from exc
            self._install(task, allow_older=True)
            self.metrics.cold_loads.observe(time.perf_counter() - started)
            log.info("task %s version %d loaded (%.0f ms)", name, version, (time.perf_counter() - started) * 1000)
            return task

    def _not_found(self, name: str) -> TaskNotFound:
        why = self.failed.get(name)
        if why is not None:
            return TaskNotFound(f"task {name!r} is stored but this server cannot serve it: {why}")
        return TaskNotFound(f"no task named {name!r}; GET /tasks lists the registered ones")

    def stored_manifest(self, name: str) -> Manifest:
        """The live version's manifest from the store, without loading the task here."""
        live = self._live.get(name)
        if live is None:
            raise self._not_found(name)
        version, entry = live
        return self.store.load(name, version, entry).manifest

    def tasks(self) -> list[LoadedTask]:
        """The resident tasks, by name."""
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.manifest.task)

    def servable_count(self) -> int:
        """Registered tasks a request can get: all but the failed ones, unless an older version is resident."""
        resident = {t.name for t in self.tasks()}
        return sum(1 for name in self._live if name not in self.failed or name in resident)

    def registered(self) -> dict[str, tuple[int, StoredVersion]]:
        """Every registered task (resident or not): its live version and the index entry naming it."""
        return dict(self._live)

    def is_current(self, task: LoadedTask) -> bool:
        with self._lock:
            return self._tasks.get(task.name) is task

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
            cached = self.cache.get_or_fill(task.identity, self.flat_weights, fill, admit=lambda: self.is_current(task))
            if cached is not None:
                return cached
        return self._apply_masks(task, self._scratch_buffer())

    def task_parameters(self, task: LoadedTask, use_cache: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor the task substitutes: masked weights (views into its buffer), head, BN, fine-tuned."""
        buffer = self.task_weights(task, use_cache)
        params = {
            f"{layer.name}.weight": buffer[layer.bit_offset : layer.bit_offset + layer.numel].view(layer.shape)
            for layer in task.manifest.layers
        }
        params.update(task.overrides)
        return params

    @torch.inference_mode()
    def forward_task(
        self, task: LoadedTask, images: torch.Tensor, prove: bool = False, record: bool = True
    ) -> torch.Tensor:
        """Class probabilities [N, num_labels] for a batch of preprocessed images.

        `prove`: a registration's test forward: no cache entry, no per-task metric series.
        `record`: False for the cost model's measurements (no per-task metric series).
        """
        with self._forward_lock:
            params = self.task_parameters(task, use_cache=not prove)
            started = time.perf_counter()
            with self._slots.substituted(params) as backbone:
                logits = backbone(images.to(self.device, self.dtype))
            probabilities = torch.softmax(logits.float(), dim=1).cpu()
        if record and not prove:
            self.metrics.forward.labels(task=task.manifest.task).observe(time.perf_counter() - started)
        return probabilities

    def mixed_capacity(self, tasks: list[LoadedTask]) -> int:
        """Images one mixed batch of `tasks` may hold within PIGGYBACK_MIXED_BUDGET_MB (below 2: none)."""
        return self.mixer.max_samples(max(task.mixed_bytes for task in tasks))

    @torch.inference_mode()
    def forward_mixed(self, groups: list[tuple[LoadedTask, torch.Tensor]], record: bool = True) -> list[torch.Tensor]:
        """Class probabilities for each group's images, every group in one forward (`service.mixed_forward`).

        Each task's weights are stacked right after they are materialized, so the cache or scratch
        buffer they came from can take the next task's. Raises NotMixable when a task substitutes a
        module that cannot run per sample: the caller then runs the groups per task.
        """
        with self._forward_lock:
            shapes = [self._substituted_shapes(task) for task, _ in groups]
            batch = self.mixer.prepare(shapes, [len(images) for _, images in groups])
            for group, (task, _) in enumerate(groups):
                self.mixer.fill(batch, group, self.task_parameters(task))
            started = time.perf_counter()
            images = torch.cat([images for _, images in groups]).to(self.device, self.dtype)
            logits = self.mixer.run(batch, images)
            probabilities = [
                torch.softmax(logits[rows, : len(task.manifest.labels)].float(), dim=1).cpu()
                for rows, (task, _) in zip(batch.rows, groups, strict=True)
            ]
        if record:
            for task, _ in groups:
                self.metrics.forward.labels(task=task.manifest.task).observe(time.perf_counter() - started)
        return probabilities

    def _substituted_shapes(self, task: LoadedTask) -> dict[str, torch.Size]:
        shapes = {f"{layer.name}.weight": torch.Size(layer.shape) for layer in task.manifest.layers}
        shapes.update({name: tensor.shape for name, tensor in task.overrides.items()})
        return shapes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
