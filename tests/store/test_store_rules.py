"""The store's rules: the highest version is live, a crash never publishes, the store touches only its own
names, a read-only store serves, storage failures are typed errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mask_store import CorruptArtifact, StoreFull, StoreUnavailable, TaskNotFound, TaskStore, TaskVersionExists
from mask_store import artifact_bytes as to_bytes
from mask_store.store import RECENT_KEY
from tests.support.builders import random_task_artifact


@pytest.fixture(scope="module")
def versions(resnet18):
    """Artifacts of task `t`, versions 1..3 (different masks each), another version 2, and task `u`."""
    made = {v: to_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=v, seed=v)) for v in (1, 2, 3)}
    made["u"] = to_bytes(random_task_artifact(resnet18, "resnet18", task="u", seed=9))
    made["other 2"] = to_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=2, seed=20))
    return made


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def visible(store: TaskStore) -> dict[str, tuple[str | None, bytes | None]]:
    """Every object of the store with its tag (ETag on S3) and bytes: equal means nothing changed. The
    record of recently used tasks a server writes when it stops is a warm-up hint, not stored state."""
    keys = [key for key in store.objects.list() if key != RECENT_KEY]
    return {key: (store.objects.tag(key), store.objects.get(key)) for key in keys}


@pytest.fixture
def any_store(store_location) -> TaskStore:
    """A fresh store on each backend: a directory, and a prefix of a bucket on a real S3 server."""
    return TaskStore(store_location[1])


def test_a_version_not_higher_than_the_live_one_is_refused(any_store, versions, resnet18_layout):
    store = any_store
    store.put(versions[2], resnet18_layout)
    before = visible(store)
    for stale in (versions[1], versions["other 2"]):
        with pytest.raises(TaskVersionExists, match="not higher than its live version 2"):
            store.put(stale, resnet18_layout)
        assert visible(store) == before
    # the very artifact that is live again (a client retrying an upload whose answer it lost): success, no write
    assert store.put(versions[2], resnet18_layout).manifest.version == 2
    assert visible(store) == before
    store.put(versions[3], resnet18_layout)
    assert store.versions("t") == [2, 3] and store.get("t").manifest.version == 3
    assert store.live_tasks()["t"].version == 3


def test_racing_uploads_leave_the_highest_version_live(store_location, versions, resnet18_layout):
    for trial in range(4):
        store = TaskStore(f"{store_location[1]}/{trial}")
        store.put(versions[1])
        outcomes = {}
        barrier = threading.Barrier(2)

        def upload(version, store=store, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                store.put(versions[version])
                outcomes[version] = "stored"
            except TaskVersionExists:
                outcomes[version] = "refused"

        threads = [threading.Thread(target=upload, args=(v,)) for v in (2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes[3] == "stored"
        assert store.get("t").manifest.version == 3
        stored = {1, 2, 3} if outcomes[2] == "stored" else {1, 3}
        assert set(store.versions("t")) == stored
        named = {entry.key for entry in store.read_index()[0].tasks["t"].values()}
        assert {k for k in store.objects.list() if k != "_index.json"} == named  # a refused upload left nothing


def test_the_store_never_touches_names_it_does_not_own(tmp_path, versions):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".keep").write_text("")
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / ".piggyback-tmp-old").write_bytes(b"half")  # the store's own crash leftover may go
    foreign = {name: data for name, data in files(tmp_path).items() if not name.startswith(".piggyback")}
    store = TaskStore(tmp_path)
    store.put(versions[1])
    store.delete("t")
    after = files(tmp_path)
    assert {name: after[name] for name in foreign} == foreign
    assert store.names() == []


KILL_BEFORE_PUBLISH = """
import os, signal, sys
from mask_store import TaskStore
store = TaskStore(sys.argv[1])
store._update_index = lambda change, **_: os.kill(os.getpid(), signal.SIGKILL)  # die between write and publish
store.put(open(sys.argv[2], "rb").read())
"""


@pytest.mark.slow
def test_a_writer_killed_before_publishing_leaves_no_visible_task(store_location, tmp_path, versions):
    root, upload = store_location[1], tmp_path / "upload.safetensors"
    TaskStore(root).put(versions[1])
    upload.write_bytes(versions[2])
    done = subprocess.run([sys.executable, "-c", KILL_BEFORE_PUBLISH, root, str(upload)], timeout=120)
    assert done.returncode == -9
    store = TaskStore(root)
    assert len(store.objects.list()) == 3  # index, v1, and the unnamed v2 object the writer left
    assert store.versions("t") == [1] and store.get("t").manifest.version == 1
    store.put(versions[2])  # the same upload again succeeds and overwrites the orphan
    assert store.get("t").manifest.version == 2


def test_stores_written_before_the_index_are_read_and_kept(tmp_path, versions):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "00000001.safetensors").write_bytes(versions[1])
    (tmp_path / "t" / "00000002-0123456789abcdef.safetensors").write_bytes(versions[2])  # unpublished new-style
    store = TaskStore(tmp_path)
    assert store.versions("t") == [1] and store.index_tag() is None
    store.put(versions["u"])
    assert store.versions("t") == [1] and store.versions("u") == [1] and store.index_tag() is not None
    assert store.get("t").manifest.version == 1


def test_a_folder_named_unlike_its_task_is_reported_and_deletable(tmp_path, versions):
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "00000001.safetensors").write_bytes(versions[1])  # holds task "t"
    store = TaskStore(tmp_path)
    with pytest.raises(CorruptArtifact, match="holds task 't'"):
        store.get("renamed")
    store.delete("renamed")
    assert store.names() == [] and not (tmp_path / "renamed").exists()


def test_absurd_versions_are_refused_by_the_schema(tmp_path, resnet18):
    from mask_store.manifest import MAX_VERSION

    store = TaskStore(tmp_path)
    ok = random_task_artifact(resnet18, "resnet18", version=MAX_VERSION)
    store.put(to_bytes(ok))
    with pytest.raises(ValueError, match="less than or equal"):
        random_task_artifact(resnet18, "resnet18", version=10**300)


@contextlib.contextmanager
def mounted(kind: str, source: Path, target: Path):
    """A read-only bind mount of `source`, or a 1 MiB tmpfs; skips where mounting is not allowed."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        commands = [["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,bind,ro", str(target)]]
    else:
        commands = [["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)]]
    for command in commands:
        if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip("needs root and mount(8) to build a read-only or full file system")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_read_only_store_serves_and_refuses_writes_clearly(tmp_path, versions):
    source = tmp_path / "source"
    TaskStore(source).put(versions[1])
    (source / ".keep").write_text("")
    with mounted("ro", source, tmp_path / "ro") as root:
        store = TaskStore(root)
        assert store.get("t").manifest.version == 1
        with pytest.raises(StoreUnavailable, match="read-only"):
            store.put(versions[2])
        with pytest.raises(StoreUnavailable, match="read-only"):
            store.delete("t")
    assert TaskStore(source).versions("t") == [1]


def test_a_full_disk_is_a_typed_error_and_loses_nothing(tmp_path, versions):
    with mounted("tmpfs", tmp_path, tmp_path / "full") as root:
        store = TaskStore(root)
        with pytest.raises(StoreFull, match="no space left"):
            store.put(versions[1])  # ~1.4 MB of masks into 1 MiB
        assert store.names() == []
        assert list(root.rglob(".piggyback-tmp*")) == []
        with pytest.raises(TaskNotFound):
            store.get("t")


def test_withdraw_returns_the_store_to_its_previous_tasks(any_store, versions):
    store = any_store
    store.put(versions[1])
    before = {k: v for k, v in visible(store).items() if k != "_index.json"}
    store.put(versions[2])
    store.withdraw("t", 2)
    assert store.versions("t") == [1]
    assert {k: v for k, v in visible(store).items() if k != "_index.json"} == before


def test_put_get_versions_delete_on_every_backend(any_store, versions, resnet18_layout):
    store = any_store
    assert store.names() == [] and store.index_tag() is None
    store.put(versions[1], resnet18_layout)
    store.put(versions["u"], resnet18_layout)
    tag = store.index_tag()
    store.put(versions[2], resnet18_layout)
    assert store.index_tag() != tag  # the change marker moves with every change
    assert store.names() == ["t", "u"] and store.versions("t") == [1, 2]
    assert store.get("t").manifest.version == 2 and store.get("t", 1).manifest.version == 1
    assert [m.task for m in store.list()] == ["t", "u"]
    assert {name: live.version for name, live in store.live_tasks().items()} == {"t": 2, "u": 1}
    store.delete("t")
    assert store.names() == ["u"] and [k for k in store.objects.list() if k.startswith("t/")] == []
    with pytest.raises(TaskNotFound):
        store.get("t")
    with pytest.raises(TaskNotFound):
        store.delete("t")


def test_os_errors_outside_the_store_are_not_swallowed(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="not a directory"):
        TaskStore(target)
    assert os.path.isfile(target)
