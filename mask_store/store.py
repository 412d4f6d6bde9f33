"""A durable file-system store of task artifacts: `<root>/<task>/<version>.safetensors`.

Every write goes to a hidden temp file inside the store, is validated there, fsynced and renamed
into place, so a crash or a refused upload leaves the store exactly as it was. Deletion renames
the task's folder out of sight before removing it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from mask_store.artifact import TaskArtifact, load_artifact, read_manifest
from mask_store.backbone import BackboneLayout
from mask_store.errors import MaskStoreError, TaskNotFound
from mask_store.fsio import fsync_dir
from mask_store.manifest import Manifest

SUFFIX = ".safetensors"


class TaskVersionExists(MaskStoreError):
    """That task already has that version; bump the version to replace it."""


class TaskStore:
    """Put, get, list, version and delete task artifacts under one root directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for stale in self.root.glob(".*"):  # temp files and trash left by a crash
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def _path(self, name: str, version: int) -> Path:
        return self.root / name / f"{version:08d}{SUFFIX}"

    def versions(self, name: str) -> list[int]:
        """Stored versions of a task, oldest first (empty if none)."""
        folder = self.root / name
        if name.startswith(".") or not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def path(self, name: str, version: int | None = None) -> Path:
        """Path of a stored artifact (the latest version unless one is named)."""
        versions = self.versions(name)
        if not versions or (version is not None and version not in versions):
            raise TaskNotFound(f"no task {name!r}" + (f" version {version}" if version is not None else ""))
        return self._path(name, version if version is not None else versions[-1])

    def get(self, name: str, version: int | None = None) -> TaskArtifact:
        """Load and fully validate a stored artifact."""
        return load_artifact(self.path(name, version))

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return read_manifest(self.path(name, version))

    def list(self) -> list[Manifest]:
        """The latest manifest of every task."""
        return [self.manifest(name) for name in self.names() if self.versions(name)]

    def put(self, source: str | Path | bytes, layout: BackboneLayout | None = None) -> TaskArtifact:
        """Validate an artifact (file path or bytes) and store it durably; returns it loaded.

        Refuses with CorruptArtifact, BackboneMismatch (when `layout` is given) or TaskVersionExists,
        leaving the store byte-identical.
        """
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-", suffix=SUFFIX)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            artifact = load_artifact(tmp, display_name="uploaded artifact")
            if layout is not None:
                artifact.check_backbone(layout)
            name, version = artifact.manifest.task, artifact.manifest.version
            with self._lock:  # two uploads of the same version: exactly one wins
                if version in self.versions(name):
                    raise TaskVersionExists(
                        f"task {name!r} already has version {version}; train or upload it with a higher --version"
                    )
                final = self._path(name, version)
                final.parent.mkdir(exist_ok=True)
                os.replace(tmp, final)
                fsync_dir(final.parent)
                fsync_dir(self.root)
            return artifact
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        """Remove every version of a task. Raises TaskNotFound if there is none."""
        if not self.versions(name):
            raise TaskNotFound(f"no task {name!r}")
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.replace(self.root / name, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
