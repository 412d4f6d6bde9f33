"""The task registry: the one place that decides which tasks, at which versions, this replica serves.

It follows the store's snapshots (`TaskStore.snapshot`: a generation and every task's live version),
whoever changed the store: this process through `register`/`unregister`, or another replica sharing
it. Snapshots only move forward: one older than a generation applied or published here is refused,
so a task answered 201 here never answers 404 or an older version afterwards.

Registered is not resident. Every registered task is known from the snapshot (cheap, 10,000 of them
in a few MB); a task is loaded onto the device (read, checked against the identity the snapshot
names; proved by a forward only if no server did so before publishing it) before use
(PIGGYBACK_PRELOAD, PIGGYBACK_PINNED_TASKS, PIGGYBACK_PRELOAD_RECENT) or on its first request,
concurrent first requests sharing one load; the least recently used ones are unloaded beyond
PIGGYBACK_RESIDENT_BUDGET_MB. Their verified artifacts stay in host memory within
PIGGYBACK_HOST_BUDGET_MB (`HostTier`), so they come back without a store read.

Errors by kind: a storage or I/O error is "unavailable, retry", never a failure of that version; only
an artifact that does not parse, match the backbone or run is a failed task, listed in `failed` until
the store no longer names it.

Registration reads top to bottom: parse, check the backbone and prove it runs (`Engine.prepare`),
store and publish it (`TaskStore.publish`), install it, apply the published snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from mask_store import LiveTask, Snapshot, StoreUnavailable, TaskArtifact, TaskNotFound, TaskStore, parse_artifact
from mask_store.manifest import Manifest
from mask_store.store import IndexMissing, StoreIndex
from service.engine import Engine, LoadedTask
from service.host_tier import HostTier
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("piggyback.registry")
_NEVER = object()  # no snapshot applied yet


class GenerationBehind(StoreUnavailable):
    """The store's index went back to a lower generation than this replica serves."""


class TaskRegistry:
    def __init__(self, engine: Engine, store: TaskStore, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.settings = settings
        # `_live`: what the store's snapshot names (every registered task, cheap). `_tasks`: the resident
        # ones, on the device, least recently used first.
        self._live: dict[str, LiveTask] = {}
        self._tasks: OrderedDict[str, LoadedTask] = OrderedDict()
        self._resident_budget = int(settings.resident_budget_mb * 1024 * 1024)
        self._pinned = settings.pinned()
        self.host = HostTier(int(settings.host_budget_mb * 1024 * 1024), metrics)
        self._recent_at_start: list[str] | None = None  # the store's record of recently used tasks, read once
        self._recent_recorded: list[str] = []
        self._loading: dict[str, threading.Lock] = {}  # one load per task at a time; other tasks in parallel
        self._unload_listeners: list[Callable[[str], None]] = []
        self.failed: dict[str, str] = {}  # task name -> why this replica does not serve it
        self._failed_versions: dict[str, tuple[int, str]] = {}  # known-bad (version, identity): not reloaded
        self._applied_tag: str | None | object = _NEVER
        self._applied_generation = -1
        self.store_problem: str | None = None  # why the last store poll failed, while it does
        self._lock = threading.Lock()  # _tasks, _live, failed
        self._sync_lock = threading.Lock()  # one snapshot applied at a time, in generation order

    @classmethod
    def over_store_of(cls, engine: Engine) -> TaskRegistry:
        """A registry over the store the engine's settings name."""
        return cls(engine, TaskStore(engine.settings.store), engine.settings, engine.metrics)

    # --- changes: this replica's and the store's -----------------------------------------------
    def register(self, data: bytes) -> LoadedTask:
        """Validate, prove it runs, store durably, then serve it. A refusal changes nothing; an
        activation that fails after the store took the artifact withdraws it again.

        Under the sync lock and followed by applying the snapshot it published: a store poll holding
        an older snapshot can run neither meanwhile nor afterwards.
        """
        artifact = parse_artifact(data, "uploaded artifact")
        task = self.engine.prepare(artifact)
        with self._sync_lock:
            published = self.store.publish(data, artifact, proven=True)
            try:
                self._install(task, allow_older=False)
            except BaseException:
                log.exception("activation of %s version %d failed; withdrawing it", task.name, task.version)
                self.store.withdraw(task.name, task.version)
                raise
            self._apply(published.snapshot)
        live = published.snapshot.tasks.get(task.name)
        if live is not None and (live.version, live.identity) == (task.version, task.identity):
            self.host.keep(live, artifact)
        return task

    def unregister(self, name: str) -> None:
        """Remove from the store and from serving; requests already holding the task still finish."""
        with self._sync_lock:
            snapshot = self.store.delete(name)
            self._deactivate(name)
            self._apply(snapshot)

    def sync_with_store(self) -> bool:
        """Serve exactly what the store names (changes by any process); True when fully applied.

        Cheap when nothing changed: one tag read. A storage or I/O error while loading a task is
        retried at the next call.
        """
        with self._sync_lock:
            if self.store.index_tag() == self._applied_tag:
                return True
            snapshot = self.store.snapshot()
            if snapshot.tag is None and self._applied_generation > 0:
                raise IndexMissing(
                    f"the store index of {self.store.url} is gone (generation {self._applied_generation} was served "
                    "here): nothing is unregistered; rebuild it with POST /admin/store/rebuild-index"
                )
            return self._apply(snapshot)

    def rebuild_index(self) -> StoreIndex:
        """After the store's index was lost: a new one from the task objects, then served."""
        index = self.store.rebuild_index()
        self.sync_with_store()
        return index

    def _apply(self, snapshot: Snapshot) -> bool:
        """Serve what `snapshot` names (the caller holds the sync lock), loading what PIGGYBACK_PRELOAD
        asks for. One at a lower generation than one applied here is refused: snapshots only move forward."""
        if snapshot.generation < self._applied_generation:
            raise GenerationBehind(
                f"the store index is at generation {snapshot.generation}, behind generation "
                f"{self._applied_generation} served here: the store was reset or restored; serving what this "
                "replica has (restart it, or rebuild the index, to follow the store)"
            )
        for name in set(self._live) - set(snapshot.tasks):
            self._deactivate(name)
            log.info("task %s was unregistered in the store", name)
        with self._lock:
            self._live = dict(snapshot.tasks)
            self._count_resident()
        complete = True
        for live in self._to_preload(snapshot.tasks):
            if live.name not in self._pinned and self._resident_bytes() >= self._resident_budget:
                break  # full: the rest load on their first request
            try:
                self._load(live, keep_serving=False)
            except StoreUnavailable as exc:  # I/O (EIO, ESTALE, a lost network): never a bad task
                complete = False
                log.warning("task %s version %d: store unavailable, will retry: %s", live.name, live.version, exc)
            except TaskNotFound:
                pass  # a bad artifact: recorded in `failed`, the previous version (if any) kept
        for name in {t.name for t in self.tasks()} - set(snapshot.tasks):  # resident, never in the snapshot
            self._deactivate(name)
        self._forget_failures_except(set(snapshot.tasks))
        if complete:
            self._applied_tag = snapshot.tag
            self._applied_generation = snapshot.generation
        return complete

    def _to_preload(self, live: dict[str, LiveTask]) -> list[LiveTask]:
        """Tasks to load now rather than on first use: pinned ones first, then at start-up the most recently
        used ones the store recorded (PIGGYBACK_PRELOAD_RECENT: a restart meets no cold storm), then with
        PIGGYBACK_PRELOAD=all every other one (the caller stops at the resident budget: a long tail beyond
        it loads on demand)."""
        names = dict.fromkeys(n for n in live if n in self._pinned)  # an ordered set
        if self._recent_at_start is None:
            limit = self.settings.preload_recent
            self._recent_at_start = self.store.recent_tasks()[:limit] if limit else []
            names.update(dict.fromkeys(n for n in self._recent_at_start if n in live))
        if self.settings.preload == "all":
            names.update(dict.fromkeys(live))
        return [
            live[name]
            for name in names
            if self._resident_if_current(live[name]) is None
            and self._failed_versions.get(name) != (live[name].version, live[name].identity)
        ]

    # --- residency -----------------------------------------------------------------------------
    def on_unload(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` (in whichever thread unloads) each time a task stops being resident:
        evicted beyond the budget, or unregistered (here or in the store). Ray Serve's task routing
        follows the resident set through it."""
        self._unload_listeners.append(listener)

    def _retire(self, task: LoadedTask, unloaded: bool) -> None:
        """Free a task that left `_tasks` (the caller released the lock); tell the listeners if its name
        is no longer resident (not when a newer version of it replaced it)."""
        self.engine.retire(task)
        if unloaded:
            for listener in self._unload_listeners:
                listener(task.name)

    def _install(self, task: LoadedTask, allow_older: bool) -> None:
        """Make `task` resident and served. A registration never replaces a higher resident version;
        a load from the snapshot may (allow_older): the store is the truth after an unregister."""
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
        if current is not None:
            self._retire(current, unloaded=False)
        for old in evicted:
            self._retire(old, unloaded=True)

    def _evict_beyond_budget(self, keep: str) -> list[LoadedTask]:
        """Unload least recently used tasks (never pinned ones, nor `keep`) until the resident ones fit
        the budget; the caller holds the lock. Requests holding an evicted task still finish."""
        evicted, resident = [], self._resident_bytes()
        for name in list(self._tasks):
            if resident <= self._resident_budget:
                break
            if name != keep and name not in self._pinned:
                evicted.append(self._tasks.pop(name))
                resident -= evicted[-1].nbytes
                self.metrics.resident_evictions.inc()
        return evicted

    def remember_recent(self) -> None:
        """Record the most recently used resident tasks in the store, when they changed since the last
        record, for the next start-up of any replica (the store watcher calls it; so does shutdown)."""
        with self._lock:
            names = list(reversed(self._tasks))[: self.settings.preload_recent]
        if names and names != self._recent_recorded:
            self.store.remember_recent(names)
            self._recent_recorded = names

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
            self._retire(task, unloaded=True)
        self.host.forget(name)
        self.metrics.forget_task(name)

    def _record_failure(self, live: LiveTask, exc: Exception) -> None:
        reason = f"version {live.version}: {exc}"
        with self._lock:
            self.failed[live.name] = reason
            self._failed_versions[live.name] = (live.version, live.identity)
        self.metrics.task_load_failures.labels(kind=type(exc).__name__).inc()
        kept = self._task_or_none(live.name)
        serving = f"still serving version {kept.version}" if kept else "not serving it"
        log.error("task %s %s; %s", live.name, reason, serving)

    def _forget_failures_except(self, stored: set[str]) -> None:
        """A failed task that the store no longer names is no longer anyone's problem: unlisted."""
        with self._lock:
            for name in set(self.failed) - stored:
                del self.failed[name]
                self._failed_versions.pop(name, None)

    def _task_or_none(self, name: str) -> LoadedTask | None:
        with self._lock:
            return self._tasks.get(name)

    def _resident_if_current(self, live: LiveTask) -> LoadedTask | None:
        with self._lock:
            task = self._tasks.get(live.name)
            if task is None or task.version != live.version or live.identity not in ("", task.identity):
                return None
            self._tasks.move_to_end(live.name)
            return task

    def _load(self, live: LiveTask, keep_serving: bool = True) -> LoadedTask:
        """Load the live version. When it cannot be (I/O, a bad artifact) and `keep_serving`, an older
        version still resident here is returned instead; else the error is raised."""
        with self._lock:
            gate = self._loading.setdefault(live.name, threading.Lock())
        with gate:
            resident = self._resident_if_current(live)
            if resident is not None:  # another request loaded it meanwhile
                return resident
            kept = self._task_or_none(live.name) if keep_serving else None  # served while the new one cannot be
            if self._failed_versions.get(live.name) == (live.version, live.identity):
                if kept is not None:
                    return kept
                raise self._not_found(live.name)
            started = time.perf_counter()
            try:
                task, artifact = self._prepared(live)
            except (StoreUnavailable, OSError) as exc:
                if kept is not None:
                    return kept
                raise StoreUnavailable(
                    f"task {live.name!r} version {live.version} cannot be read from the store now: {exc}"
                ) from exc
            except Exception as exc:  # an artifact that does not parse, match this backbone, or run
                self._record_failure(live, exc)
                if kept is not None:
                    return kept
                raise self._not_found(live.name) from exc
            self._install(task, allow_older=True)
            self.host.keep(live, artifact)
            elapsed = time.perf_counter() - started
            self.metrics.cold_loads.observe(elapsed)
            log.info("task %s version %d loaded (%.0f ms)", live.name, live.version, elapsed * 1000)
            return task

    def _prepared(self, live: LiveTask) -> tuple[LoadedTask, TaskArtifact]:
        """The live version on the device: from the host tier if kept there (it ran here before), else read
        from the store, checked, and proved unless the index says a server proved it."""
        kept = self.host.get(live)
        if kept is not None:
            return self.engine.prepare(kept, prove=False), kept
        artifact = self.store.load(live)
        return self.engine.prepare(artifact, prove=not live.proven), artifact

    def _not_found(self, name: str) -> TaskNotFound:
        why = self.failed.get(name)
        if why is not None:
            return TaskNotFound(f"task {name!r} is stored but this server cannot serve it: {why}")
        return TaskNotFound(f"no task named {name!r}; GET /tasks lists the registered ones")

    # --- what requests read --------------------------------------------------------------------
    def resident_task(self, name: str) -> LoadedTask | None:
        """The task if it is resident at its live version (no I/O: safe on an event loop), else None."""
        live = self._live.get(name)
        return self._resident_if_current(live) if live is not None else None

    def is_resident(self, name: str) -> bool:
        """Whether some version of `name` is on the device here (without touching its recency)."""
        return self._task_or_none(name) is not None

    def task(self, name: str) -> LoadedTask:
        """The live version of a registered task, loaded first if it is cold (blocking: store I/O and a
        proof forward). Concurrent first requests for one task share one load."""
        live = self._live.get(name)
        if live is None:
            raise self._not_found(name)
        return self._resident_if_current(live) or self._load(live)

    def stored_manifest(self, name: str) -> Manifest:
        """The live version's manifest from the store, without loading the task here."""
        live = self._live.get(name)
        if live is None:
            raise self._not_found(name)
        return self.store.load(live).manifest

    def tasks(self) -> list[LoadedTask]:
        """The resident tasks, by name."""
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.name)

    def servable_count(self) -> int:
        """Registered tasks a request can get: all but the failed ones, unless an older version is resident."""
        resident = {t.name for t in self.tasks()}
        return sum(1 for name in self._live if name not in self.failed or name in resident)

    def registered(self) -> dict[str, LiveTask]:
        """Every registered task (resident or not) and the live version the store names."""
        return dict(self._live)

    def is_current(self, task: LoadedTask) -> bool:
        with self._lock:
            return self._tasks.get(task.name) is task
