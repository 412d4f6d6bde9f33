"""The durable task store, over any `ObjectStore` (a directory, or an S3-compatible bucket).

Layout: one object per stored version, `<task>/<version:08d>-<identity>.safetensors`, and one index
object, `_index.json`, naming every stored version and its artifact's identity under a generation
number. The index is the only truth a reader trusts:

- put: validate in memory, write the artifact object (nothing names it yet, so nobody reads it),
  then publish it by a compare-and-swap of the index to generation + 1. A writer killed before the
  swap leaves an unnamed object that no reader serves; a refused upload writes nothing at all.
- delete: swap the index without the task, then remove its objects.
- Replicas poll `index_tag()` (one metadata request) and re-read the index only when it changed.

The live version of a task is its highest stored version; a put that is not higher is refused.
Stores written before the index existed (`<task>/<version:08d>.safetensors`, no index) are read by
listing them; the first write records them in a new index. The store never touches other names.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from mask_store.artifact import TaskArtifact, artifact_identity, parse_artifact
from mask_store.backbone import BackboneLayout
from mask_store.errors import CorruptArtifact, MaskStoreError, TaskNotFound
from mask_store.manifest import Manifest
from mask_store.object_location import open_objects
from mask_store.objects import ObjectConflict, ObjectStore, StoreUnavailable

log = logging.getLogger("piggyback.store")
INDEX_KEY = "_index.json"
LEGACY_KEY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(\d{8,12})\.safetensors$")
PUBLISH_ATTEMPTS = 50


class TaskVersionExists(MaskStoreError):
    """That version is not higher than the task's live version; bump the version to replace it."""


class StoredVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    identity: str = ""  # empty: listed from a store written before the index, not yet read


class StoreIndex(BaseModel):
    generation: int = 0
    tasks: dict[str, dict[int, StoredVersion]] = {}

    def live(self, name: str) -> tuple[int, StoredVersion] | None:
        versions = self.tasks.get(name)
        return max(versions.items()) if versions else None


@dataclass(frozen=True)
class LiveTask:
    """What a replica should serve for one task: its highest stored version."""

    name: str
    version: int
    identity: str


class TaskStore:
    """Put, get, list, version and delete task artifacts. Opening a store writes nothing."""

    def __init__(self, location: str | Path | ObjectStore):
        self.objects = open_objects(location)
        self.url = self.objects.url

    # --- the index ---------------------------------------------------------------------------
    def index_tag(self) -> str | None:
        """Changes whenever the set of stored tasks or versions changes (a cheap poll)."""
        return self.objects.tag(INDEX_KEY)

    def read_index(self) -> tuple[StoreIndex, str | None]:
        """The index and its tag (None: no index yet, the listing of a pre-index store)."""
        found = self.objects.get_tagged(INDEX_KEY)
        if found is None:
            return self._index_from_listing(), None
        data, tag = found
        try:
            return StoreIndex.model_validate_json(data), tag
        except ValidationError as exc:
            raise StoreUnavailable(f"the store index {INDEX_KEY} in {self.url} is damaged: {exc}") from exc

    def _index_from_listing(self) -> StoreIndex:
        tasks: dict[str, dict[int, StoredVersion]] = {}
        for key in self.objects.list():
            match = LEGACY_KEY.match(key)
            if match:
                tasks.setdefault(match[1], {})[int(match[2])] = StoredVersion(key=key)
        return StoreIndex(tasks=tasks)

    def _update_index(self, change: Callable[[StoreIndex], None]) -> StoreIndex:
        """Apply `change` to the latest index and publish it; retried when another writer won."""
        for attempt in range(PUBLISH_ATTEMPTS):
            index, tag = self.read_index()
            change(index)  # may refuse (raise) after seeing the latest state
            index.generation += 1
            try:
                self.objects.put_if(INDEX_KEY, index.model_dump_json(indent=1).encode(), tag)
                return index
            except ObjectConflict:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreUnavailable(f"the store index in {self.url} kept changing; {PUBLISH_ATTEMPTS} attempts lost")

    def live_tasks(self) -> dict[str, LiveTask]:
        """The version every replica should serve, per task."""
        index, _ = self.read_index()
        return {
            name: LiveTask(name, version, entry.identity)
            for name in index.tasks
            if (found := index.live(name)) is not None
            for version, entry in [found]
        }

    # --- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.read_index()[0].tasks)

    def versions(self, name: str) -> list[int]:
        """Stored versions of a task, oldest first (empty if none)."""
        return sorted(self.read_index()[0].tasks.get(name, {}))

    def _entry(self, name: str, version: int | None) -> tuple[int, StoredVersion]:
        versions = self.read_index()[0].tasks.get(name, {})
        if not versions or (version is not None and version not in versions):
            raise TaskNotFound(f"no task {name!r}" + (f" version {version}" if version is not None else ""))
        chosen = version if version is not None else max(versions)
        return chosen, versions[chosen]

    def get(self, name: str, version: int | None = None) -> TaskArtifact:
        """Load and fully validate a stored artifact (the live version unless one is named)."""
        version, entry = self._entry(name, version)
        data = self.objects.get(entry.key)
        if data is None:
            raise CorruptArtifact(f"{entry.key} is named by the store index but missing from {self.url}")
        artifact = parse_artifact(data, entry.key)
        manifest = artifact.manifest
        if (manifest.task, manifest.version) != (name, version):
            raise CorruptArtifact(
                f"{entry.key} holds task {manifest.task!r} version {manifest.version}, not {name!r} version "
                f"{version}: rename the folder to the task's name, or remove it"
            )
        if entry.identity and artifact_identity(manifest) != entry.identity:
            raise CorruptArtifact(f"{entry.key} differs from the artifact the store index recorded")
        return artifact

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return self.get(name, version).manifest

    def list(self) -> list[Manifest]:
        """The live manifest of every task."""
        return [self.manifest(name) for name in self.names()]

    # --- writing -------------------------------------------------------------------------------
    def put(
        self,
        source: str | Path | bytes,
        layout: BackboneLayout | None = None,
        prove: Callable[[TaskArtifact], None] | None = None,
    ) -> TaskArtifact:
        """Validate an artifact (file path or bytes) and store it durably; returns it loaded.

        Refuses with CorruptArtifact, BackboneMismatch (when `layout` is given), whatever `prove`
        raises (e.g. a forward pass that fails), or TaskVersionExists; a refusal writes nothing.
        """
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        artifact = parse_artifact(data, "uploaded artifact")
        if layout is not None:
            artifact.check_backbone(layout)
        if prove is not None:
            prove(artifact)
        name, version = artifact.manifest.task, artifact.manifest.version
        identity = artifact_identity(artifact.manifest)
        self._refuse_stale(self.read_index()[0], name, version)
        key = f"{name}/{version:08d}-{identity[:16]}.safetensors"
        self.objects.put(key, data)  # not yet named by the index: invisible to every reader

        def publish(index: StoreIndex) -> None:
            self._refuse_stale(index, name, version)
            index.tasks.setdefault(name, {})[version] = StoredVersion(key=key, identity=identity)

        try:
            self._update_index(publish)
        except TaskVersionExists:  # lost a race to an equal or higher version: leave no trace
            self._delete_unnamed(key)
            raise
        return artifact

    @staticmethod
    def _refuse_stale(index: StoreIndex, name: str, version: int) -> None:
        live = index.live(name)
        if live is not None and version <= live[0]:
            raise TaskVersionExists(
                f"task {name!r} version {version} is not higher than its live version {live[0]}; "
                f"train or upload it with --version {live[0] + 1} or higher"
            )

    def _delete_unnamed(self, key: str) -> None:
        index, _ = self.read_index()
        if not any(entry.key == key for versions in index.tasks.values() for entry in versions.values()):
            self.objects.delete(key)

    def withdraw(self, name: str, version: int) -> None:
        """Undo a put whose activation failed: the version leaves the index, then its object goes."""
        removed: list[StoredVersion] = []

        def drop(index: StoreIndex) -> None:
            versions = index.tasks.get(name, {})
            if version in versions:
                removed.append(versions.pop(version))
                if not versions:
                    del index.tasks[name]

        self._update_index(drop)
        for entry in removed:
            self.objects.delete(entry.key)

    def delete(self, name: str) -> None:
        """Remove every version of a task. Raises TaskNotFound if there is none."""
        removed: list[StoredVersion] = []

        def drop(index: StoreIndex) -> None:
            if name not in index.tasks:
                raise TaskNotFound(f"no task {name!r}")
            removed.extend(index.tasks.pop(name).values())

        self._update_index(drop)
        for entry in removed:
            try:
                self.objects.delete(entry.key)
            except StoreUnavailable as exc:  # unnamed now, so harmless; a later cleanup may retry
                log.warning("task %s unregistered, but %s stays in the store: %s", name, entry.key, exc)
