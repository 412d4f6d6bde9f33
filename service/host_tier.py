"""The host tier: verified artifacts of recently used tasks, in host memory, within
PIGGYBACK_HOST_BUDGET_MB, least recently used dropped first.

A task unloaded from the device tier (the resident set) then costs only a move back to the device on
its next request: no store read, no checksum pass, no proof. That is the difference for an S3 store,
where one read takes tens of milliseconds, and for a long tail cycling through the resident set.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from mask_store import LiveTask, TaskArtifact
from service.metrics import Metrics


def artifact_nbytes(artifact: TaskArtifact) -> int:
    """Host bytes an artifact holds: its planes (decoded and as stored) and its own tensors."""
    tensors = sum(t.numel() * t.element_size() for t in artifact.task_tensors.values())
    return sum(map(len, artifact.planes)) + sum(map(len, artifact.stored)) + tensors


class HostTier:
    def __init__(self, budget_bytes: int, metrics: Metrics) -> None:
        self._budget = budget_bytes
        self._metrics = metrics
        self._artifacts: OrderedDict[str, tuple[TaskArtifact, int]] = OrderedDict()  # by store key, LRU first
        self._key_of: dict[str, str] = {}  # task name -> the store key kept (one version per task)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, live: LiveTask) -> TaskArtifact | None:
        """The artifact `live` names, if kept here (its store key is content-addressed: the same bytes)."""
        with self._lock:
            found = self._artifacts.get(live.key)
            if found is None:
                return None
            self._artifacts.move_to_end(live.key)
        self._metrics.host_tier_hits.inc()
        return found[0]

    def keep(self, live: LiveTask, artifact: TaskArtifact) -> None:
        """Keep an artifact that loaded and ran here, in place of the task's other versions; the least
        recently used ones go beyond the budget."""
        size = artifact_nbytes(artifact)
        with self._lock:
            if live.key in self._artifacts or size > self._budget:
                return
            self._drop(live.name)
            self._artifacts[live.key] = (artifact, size)
            self._bytes += size
            self._key_of[live.name] = live.key
            while self._bytes > self._budget:
                key, (dropped, size) = self._artifacts.popitem(last=False)
                self._bytes -= size
                if self._key_of.get(dropped.manifest.task) == key:
                    del self._key_of[dropped.manifest.task]
                self._metrics.host_tier_evictions.inc()
            self._count()

    def forget(self, name: str) -> None:
        """Drop every version of `name` (unregistered, or replaced by a newer version)."""
        with self._lock:
            self._drop(name)
            self._count()

    def _drop(self, name: str) -> None:
        key = self._key_of.pop(name, None)
        if key is not None:
            self._bytes -= self._artifacts.pop(key)[1]

    def _count(self) -> None:
        self._metrics.host_tier_tasks.set(len(self._artifacts))
        self._metrics.host_tier_bytes.set(self._bytes)
