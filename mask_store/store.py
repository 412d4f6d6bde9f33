"""The durable task store, over any `ObjectStore` (a directory, or an S3-compatible bucket).

Layout: one object per stored version, `<task>/<version:08d>-<identity>.safetensors`, and one index
object, `_index.json`, naming every stored version and its artifact's identity under a generation
number. The index is the only truth a reader trusts:

- put: validate in memory, write the artifact object (nothing names it yet, so nobody reads it),
  then publish it by a compare-and-swap of the index to generation + 1. A writer killed before the
  swap leaves an unnamed object that no reader serves; a refused upload writes nothing at all.
- delete: swap the index without the task, then remove its objects.
- Replicas poll `index_tag()` (one metadata request) and re-read the index only when it changed.

The live version of a task is its highest stored version; a put that is not higher is refused, except
the very artifact that is already live, which succeeds again without writing (a client retrying an
upload whose answer it lost). A put that fails to publish removes its object; a publish whose outcome
is unknown (the network failed after sending) is resolved by re-reading the index.
A missing index beside current-layout objects is damage, never "no tasks": readers keep what they
serve and are told to rebuild it (`rebuild_index`, `POST /admin/store/rebuild-index`).
Stores written before the index existed (`<task>/<version:08d>.safetensors`, no index) are read by
listing them; the first write records them in a new index. The store never touches other names.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from mask_store.artifact import TaskArtifact, artifact_identity, parse_artifact
from mask_store.backbone import BackboneLayout
from mask_store.errors import CorruptArtifact, MaskStoreError, TaskNotFound
from mask_store.manifest import Manifest
from mask_store.object_location import open_objects
from mask_store.objects import ObjectConflict, ObjectStore, StoreUnavailable

log = logging.getLogger("piggyback.store")
INDEX_KEY = "_index.json"
RECENT_KEY = "_recent.json"  # a hint, not the truth: the tasks a server last used most, for warm-up
LEGACY_KEY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(\d{8,12})\.safetensors$")
CURRENT_KEY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(\d{8,12})-[0-9a-f]{16}\.safetensors$")
PUBLISH_ATTEMPTS = 50


class TaskVersionExists(MaskStoreError):
    """That version is not higher than the task's live version; bump the version to replace it."""


class StoredVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    identity: str = ""  # empty: listed from a store written before the index, not yet read
    # a server proved it runs (one forward on a backbone whose fingerprint the manifest names) before
    # publishing: other replicas check the identity on load and skip the proof
    proven: bool = False


class StoreIndex(BaseModel):
    generation: int = 0
    tasks: dict[str, dict[int, StoredVersion]] = {}

    def live(self, name: str) -> tuple[int, StoredVersion] | None:
        versions = self.tasks.get(name)
        return max(versions.items()) if versions else None


class IndexMissing(StoreUnavailable):
    """The index is gone but task objects are there: damage to repair, not an empty store."""


@contextlib.contextmanager
def _collector_paused():
    """Parsing a 10,000-task index allocates tens of thousands of objects and no garbage; left on, the
    cyclic collector runs full passes over the whole process meanwhile (measured: 250 ms instead of 20)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class LiveTask(NamedTuple):
    """What a replica should serve for one task: its highest stored version, and where it is. A named
    tuple: a snapshot builds one per registered task (10,000 in 4 ms; a frozen dataclass takes 11)."""

    name: str
    version: int
    identity: str  # sha256 of the manifest; empty for a pre-index store's object not yet read
    key: str
    proven: bool = False  # proved to run by the server that published it


@dataclass(frozen=True)
class Snapshot:
    """Every task's live version at one index generation; `tag` identifies it for a cheap poll
    (None: a pre-index store, listed)."""

    generation: int
    tag: str | None
    tasks: dict[str, LiveTask]

    @classmethod
    def of(cls, index: StoreIndex, tag: str | None) -> Snapshot:
        tasks = {}
        with _collector_paused():  # 10,000 new objects: no full collection passes over the process meanwhile
            for name, versions in index.tasks.items():
                if versions:
                    version = max(versions)
                    entry = versions[version]
                    tasks[name] = LiveTask(name, version, entry.identity, entry.key, entry.proven)
        return cls(index.generation, tag, tasks)


@dataclass(frozen=True)
class Published:
    """A stored artifact and the snapshot of the index that names it."""

    artifact: TaskArtifact
    snapshot: Snapshot


def _copy(index: StoreIndex) -> StoreIndex:
    """A copy whose task and version maps a change may edit (the entries themselves are frozen)."""
    with _collector_paused():
        tasks = {name: dict(versions) for name, versions in index.tasks.items()}
    return StoreIndex.model_construct(generation=index.generation, tasks=tasks)


def _index_bytes(index: StoreIndex) -> bytes:
    """The index as stored: fields at their defaults left out (an unproved entry costs no bytes)."""
    return index.model_dump_json(exclude_defaults=True).encode()  # one line: 10,000 tasks in 1.6 MB, 6 ms


def _names(index: StoreIndex, name: str, version: int, entry: StoredVersion) -> bool:
    """Whether `index` names exactly this artifact as the task's live version (proved or not)."""
    live = index.live(name)
    return live is not None and (live[0], live[1].key, live[1].identity) == (version, entry.key, entry.identity)


class TaskStore:
    """Put, get, list, version and delete task artifacts. Opening a store writes nothing."""

    def __init__(self, location: str | Path | ObjectStore):
        self.objects = open_objects(location)
        self.url = self.objects.url
        # the index last read or written here, by its tag: a registration on a 10,000-task store then
        # re-reads the bytes (the tag is their hash or ETag) but does not parse them again (60 ms)
        self._parsed: tuple[str, StoreIndex] | None = None

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
        parsed = self._parsed
        if parsed is not None and parsed[0] == tag:
            return _copy(parsed[1]), tag
        try:
            with _collector_paused():
                index = StoreIndex.model_validate_json(data)
        except ValidationError as exc:
            raise StoreUnavailable(f"the store index {INDEX_KEY} in {self.url} is damaged: {exc}") from exc
        self._parsed = (tag, index)
        return _copy(index), tag

    def _index_from_listing(self) -> StoreIndex:
        tasks: dict[str, dict[int, StoredVersion]] = {}
        current = 0
        for key in self.objects.list():
            match = LEGACY_KEY.match(key)
            if match:
                tasks.setdefault(match[1], {})[int(match[2])] = StoredVersion(key=key)
            current += bool(CURRENT_KEY.match(key))
        if current and not tasks:  # a pre-index store's extra objects are a crashed writer's, not a lost index
            raise IndexMissing(
                f"the store index {INDEX_KEY} is missing from {self.url} but {current} task objects are there; "
                "nothing was unregistered: rebuild the index with POST /admin/store/rebuild-index"
            )
        return StoreIndex(tasks=tasks)

    def rebuild_index(self) -> StoreIndex:
        """A new index naming every task object in the store, after the index was lost.

        Each object is read and fully validated (its identity is recomputed). The generation starts
        from the clock in milliseconds, above any count the lost index can have reached, so replicas
        that order snapshots by generation accept it. Refused when an index exists.
        """
        if self.objects.tag(INDEX_KEY) is not None:
            raise ObjectConflict(f"{self.url} has an index; only a lost one is rebuilt")
        tasks: dict[str, dict[int, StoredVersion]] = {}
        for key in self.objects.list():
            if not CURRENT_KEY.match(key):
                continue
            data = self.objects.get(key)
            if data is None:
                continue
            manifest = parse_artifact(data, key).manifest
            tasks.setdefault(manifest.task, {})[manifest.version] = StoredVersion(
                key=key, identity=artifact_identity(manifest)
            )
        index = StoreIndex(generation=int(time.time() * 1000), tasks=tasks)
        self.objects.put_if(INDEX_KEY, _index_bytes(index), None)
        log.warning("rebuilt the index of %s: %d tasks, generation %d", self.url, len(tasks), index.generation)
        return index

    def _update_index(
        self, change: Callable[[StoreIndex], bool | None], known: tuple[StoreIndex, str | None] | None = None
    ) -> tuple[StoreIndex, str | None]:
        """Apply `change` to the latest index and publish it; retried when another writer won.

        Returns the published index (read it, never change it: this store keeps it as its parsed copy)
        and its tag. `change` may refuse (raise) after seeing the latest
        state, or return False when the index already says what it wants: nothing is written then.
        `known`: an index and tag just read, tried first (the compare-and-swap refuses it if stale).
        """
        for attempt in range(PUBLISH_ATTEMPTS):
            index, tag = known if attempt == 0 and known is not None else self.read_index()
            if change(index) is False:
                return index, tag
            index.generation += 1
            try:
                tag = self.objects.put_if(INDEX_KEY, _index_bytes(index), tag)
            except ObjectConflict:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
                continue
            self._parsed = (tag, index)
            return index, tag  # callers only read it (a snapshot): no copy of 10,000 entries
        raise StoreUnavailable(f"the store index in {self.url} kept changing; {PUBLISH_ATTEMPTS} attempts lost")

    def snapshot(self) -> Snapshot:
        """What every replica should serve: each task's live version, at the index's generation."""
        return Snapshot.of(*self.read_index())

    def live_tasks(self) -> dict[str, LiveTask]:
        """The version every replica should serve, per task."""
        return self.snapshot().tasks

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
        return self.load(LiveTask(name, version, entry.identity, entry.key))

    def load(self, live: LiveTask) -> TaskArtifact:
        """Load and fully validate the artifact a snapshot names (no index read), checked against the
        identity the index recorded for it."""
        data = self.objects.get(live.key)
        if data is None:
            raise CorruptArtifact(f"{live.key} is named by the store index but missing from {self.url}")
        artifact = parse_artifact(data, live.key)
        manifest = artifact.manifest
        if (manifest.task, manifest.version) != (live.name, live.version):
            raise CorruptArtifact(
                f"{live.key} holds task {manifest.task!r} version {manifest.version}, not {live.name!r} version "
                f"{live.version}: rename the folder to the task's name, or remove it"
            )
        if live.identity and artifact_identity(manifest) != live.identity:
            raise CorruptArtifact(f"{live.key} differs from the artifact the store index recorded")
        return artifact

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return self.get(name, version).manifest

    def list(self) -> list[Manifest]:
        """The live manifest of every task."""
        return [self.manifest(name) for name in self.names()]

    def recent_tasks(self) -> list[str]:
        """The task names a server last recorded as its most recently used, most recent first; [] when
        there is no record or it cannot be read (a hint for warm-up, never a reason to fail)."""
        try:
            data = self.objects.get(RECENT_KEY)
            names = json.loads(data)["tasks"] if data is not None else []
        except (MaskStoreError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the recently used tasks recorded in %s: %s", self.url, exc)
            return []
        return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []

    def remember_recent(self, names: list[str]) -> None:
        """Record this server's most recently used tasks (last writer wins: it is a hint)."""
        self.objects.put(RECENT_KEY, json.dumps({"tasks": names}).encode())

    # --- writing -------------------------------------------------------------------------------
    def put(self, source: str | Path | bytes, layout: BackboneLayout | None = None) -> TaskArtifact:
        """Validate an artifact (file path or bytes) and store it durably; returns it loaded."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        artifact = parse_artifact(data, "uploaded artifact")
        if layout is not None:
            artifact.check_backbone(layout)
        return self.publish(data, artifact).artifact

    def publish(self, data: bytes, artifact: TaskArtifact | None = None, proven: bool = False) -> Published:
        """Store an artifact durably; returns it with the snapshot of the index that names it.

        `artifact`: `data` already parsed and checked by the caller. `proven`: the caller (a server)
        checked it against its backbone and proved it runs; the index says so, and replicas loading it
        skip the proof. Refuses with CorruptArtifact or TaskVersionExists; a refusal
        writes nothing, and neither does a failure to publish (the object written for it is removed).
        """
        if artifact is None:
            artifact = parse_artifact(data, "uploaded artifact")
        name, version = artifact.manifest.task, artifact.manifest.version
        identity = artifact_identity(artifact.manifest)
        key = f"{name}/{version:08d}-{identity[:16]}.safetensors"
        entry = StoredVersion(key=key, identity=identity, proven=proven)
        index, tag = self.read_index()
        if tag is None:  # a store's first write: its index first, so no task object ever stands without one
            index, tag = self._update_index(lambda index: None)
        if not _names(index, name, version, entry):
            self._refuse_stale(index, name, version)
            self.objects.put(key, data)  # not yet named by the index: invisible to every reader

        def publish(index: StoreIndex) -> bool | None:
            if _names(index, name, version, entry):
                return False  # the very artifact is already live: success, nothing to write
            self._refuse_stale(index, name, version)
            index.tasks.setdefault(name, {})[version] = entry

        try:
            index, tag = self._update_index(publish, known=(index, tag))
        except TaskVersionExists:  # lost a race to an equal or higher version: leave no trace
            self._delete_unnamed(key)
            raise
        except StoreUnavailable as error:
            index, tag = self._outcome_of_publish(error, key, name, version, entry)
        return Published(artifact, Snapshot.of(index, tag))

    def _outcome_of_publish(
        self, error: StoreUnavailable, key: str, name: str, version: int, entry: StoredVersion
    ) -> tuple[StoreIndex, str | None]:
        """After a failed index write: if the index names the artifact anyway (the write landed, its answer
        was lost), it is published; otherwise its object goes (a full disk, a refused write) and the error
        stands. When the index cannot be read either, the object stays for the sweep."""
        try:
            index, tag = self.read_index()
        except MaskStoreError:
            raise error from None
        if _names(index, name, version, entry):
            log.warning("publishing %s answered %s, but the index names it: published", key, error)
            return index, tag
        with contextlib.suppress(MaskStoreError):
            self._delete_unnamed(key)
        raise error

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

    def sweep_unnamed(self, grace_s: float) -> list[str]:
        """Delete task objects no index names that are older than `grace_s` (a writer killed between
        writing its object and publishing it); younger ones may belong to a publish under way. Returns
        the keys deleted. Needs an index: with none, every object is unnamed and nothing is touched."""
        index, tag = self.read_index()
        if tag is None:
            return []
        named = {entry.key for versions in index.tasks.values() for entry in versions.values()}
        now, swept = time.time(), []
        for key in self.objects.list():
            if not CURRENT_KEY.match(key) or key in named:
                continue
            written = self.objects.modified(key)
            if written is not None and now - written > grace_s:
                self.objects.delete(key)
                swept.append(key)
                log.warning("removed %s from %s: no index names it, written %.0f s ago", key, self.url, now - written)
        return swept

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

    def delete(self, name: str) -> Snapshot:
        """Remove every version of a task; returns the snapshot published without it. TaskNotFound if none."""
        removed: list[StoredVersion] = []

        def drop(index: StoreIndex) -> None:
            if name not in index.tasks:
                raise TaskNotFound(f"no task {name!r}")
            removed.extend(index.tasks.pop(name).values())

        published = self._update_index(drop)
        for entry in removed:
            try:
                self.objects.delete(entry.key)
            except StoreUnavailable as exc:  # unnamed now, so harmless; a later cleanup may retry
                log.warning("task %s unregistered, but %s stays in the store: %s", name, entry.key, exc)
        return Snapshot.of(*published)
