"""The few object operations the task store needs, and their local-directory implementation.

The store is written once against `ObjectStore`; a backend only moves bytes. Keys are `/`-separated
relative paths (`mnist/00000003.safetensors`). The contract every backend keeps:

- `put` is all-or-nothing: a reader sees the previous object or the complete new one, never a part.
- `tag` names one exact content of a key and changes whenever the content does (an ETag on S3, a
  content hash here). It is cheap for small objects: polling the index's is how replicas notice a change.
- `put_if` is a compare-and-swap: it writes only if the key's current tag is `expected` (`None`:
  only if the key does not exist) and otherwise raises `ObjectConflict`; of two writers holding the
  same tag, exactly one wins.
- A crash at any moment leaves every key as it was or as it was written; temporary names are the
  backend's own and invisible through `list`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from mask_store.errors import MaskStoreError
from mask_store.fsio import atomic_write_bytes, fsync_dir

TEMP_PREFIX = ".piggyback-tmp-"
LOCK_NAME = ".piggyback-lock"


class ObjectConflict(MaskStoreError):
    """A conditional write lost: another writer changed the key first."""


class StoreUnavailable(MaskStoreError):
    """The store cannot be reached or written (read-only, full, no such bucket, bad credentials)."""


class StoreFull(StoreUnavailable):
    """No space left on the device that holds the store."""


class ObjectStore(ABC):
    """A flat namespace of immutable-per-put byte objects under one root URL."""

    url: str

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        found = self.get_tagged(key)
        return None if found is None else found[0]

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and the tag of exactly those bytes, or None."""

    @abstractmethod
    def tag(self, key: str) -> str | None:
        """The current tag of a key (one cheap metadata request), or None when it does not exist."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write the whole object atomically and durably."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, expected: str | None) -> str:
        """Compare-and-swap on the tag (None: the key must not exist); returns the new tag."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""

    @abstractmethod
    def modified(self, key: str) -> float | None:
        """When the object was last written (seconds since the epoch), or None when it does not exist."""


def check_key(key: str) -> list[str]:
    """A key's `/`-separated parts; ValueError for one that could escape the store's root or is empty."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return parts


def _storage_error(exc: OSError, what: str) -> StoreUnavailable:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what}: no space left on the store's device ({exc.strerror})")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreUnavailable(f"{what}: the store is read-only ({exc.strerror}); point PIGGYBACK_STORE elsewhere")
    if exc.errno == errno.ENAMETOOLONG:
        return StoreUnavailable(f"{what}: name too long for the store's file system")
    return StoreUnavailable(f"{what}: {exc.strerror or exc}")


class LocalObjects(ObjectStore):
    """Objects as files under a directory. Touches only its keys and its own `.piggyback-*` names."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)
        self._thread_lock = threading.Lock()
        if self.root.exists() and not self.root.is_dir():
            raise StoreUnavailable(f"PIGGYBACK_STORE={self.root} is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error(exc, f"cannot create the store directory {self.root}") from exc

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data, _content_tag(data)

    def tag(self, key: str) -> str | None:
        """A hash of the content, not of inode, size and mtime: with one-second timestamps (ext4 with
        small inodes, many NFS servers) and inodes reused by each rename, two index writes can share
        all three, and a replica would miss a change. The index is small: hashing it is a poll's cost."""
        found = self.get_tagged(key)
        return None if found is None else found[1]

    def modified(self, key: str) -> float | None:
        try:
            return os.stat(self._path(key)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            atomic_write_bytes(path, data, temp_prefix=TEMP_PREFIX)
            if path.parent != self.root:
                fsync_dir(self.root)  # the task's folder may be new
        except OSError as exc:
            raise _storage_error(exc, f"cannot write {key} to {self.root}") from exc

    @contextlib.contextmanager
    def _exclusive(self):
        """Serialise compare-and-swap across threads and processes sharing this directory."""
        with self._thread_lock:
            try:
                fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _storage_error(exc, f"cannot lock the store {self.root}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def put_if(self, key: str, data: bytes, expected: str | None) -> str:
        with self._exclusive():
            current = self.tag(key)
            if current != expected:
                raise ObjectConflict(f"{key} changed meanwhile (tag {current}, expected {expected})")
            self.put(key, data)
            return _content_tag(data)  # what `tag` reads back: no other writer runs under the lock

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # drop the task's folder once it is empty
                path.parent.rmdir() if path.parent != self.root else None
            fsync_dir(self.root)
        except OSError as exc:
            raise _storage_error(exc, f"cannot delete {key} from {self.root}") from exc

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath).relative_to(self.root)
            for filename in filenames:
                if filename.startswith("."):
                    continue
                key = (base / filename).as_posix() if base != Path(".") else filename
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


def _content_tag(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
