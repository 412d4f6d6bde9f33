"""The store under faults a long-lived deployment meets, on both backends (a directory and a real S3
server): a lost index, a publish that fails or whose answer is lost, an index rewritten within one
timestamp tick, a damaged index at start-up. Each ends with the store consistent and nothing lost.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from mask_store import StoreFull, StoreUnavailable, TaskStore, artifact_bytes
from mask_store.objects import LocalObjects
from mask_store.store import INDEX_KEY, IndexMissing
from service.engine import Engine
from service.metrics import Metrics
from service.registry import TaskRegistry
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.servers import png_bytes, readiness_saying, serve_in_thread, start_service, stop_process, wait_ready

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def artifacts(resnet18):
    """Task `t` versions 1 and 2, and task `u`."""
    made = {v: artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=v, seed=v)) for v in (1, 2)}
    made["u"] = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="u", seed=9))
    return made


def stored_keys(store: TaskStore) -> set[str]:
    return {key for key in store.objects.list() if key != INDEX_KEY}


def test_a_publish_that_fails_leaves_no_object_and_the_same_upload_then_succeeds(
    store_location, artifacts, monkeypatch
):
    store = TaskStore(store_location[1])
    store.put(artifacts[1])
    before = stored_keys(store)
    real_put_if = type(store.objects).put_if

    def index_write_hits_a_full_disk(self, key, data, expected):
        raise StoreFull(f"no space left writing {key}")

    monkeypatch.setattr(type(store.objects), "put_if", index_write_hits_a_full_disk)
    with pytest.raises(StoreFull):
        store.put(artifacts[2])
    assert stored_keys(store) == before  # the version 2 object was removed again
    monkeypatch.setattr(type(store.objects), "put_if", real_put_if)  # space is freed
    assert store.put(artifacts[2]).manifest.version == 2
    assert store.live_tasks()["t"].version == 2


def test_a_publish_whose_answer_is_lost_is_settled_by_the_index(store_location, artifacts, monkeypatch):
    store = TaskStore(store_location[1])
    store.put(artifacts[1])
    real_put_if = type(store.objects).put_if

    def write_lands_but_the_answer_is_lost(self, key, data, expected):
        real_put_if(self, key, data, expected)
        raise StoreUnavailable(f"connection reset while writing {key}")

    monkeypatch.setattr(type(store.objects), "put_if", write_lands_but_the_answer_is_lost)
    assert store.put(artifacts[2]).manifest.version == 2  # the index names it: published
    monkeypatch.setattr(type(store.objects), "put_if", real_put_if)
    assert store.live_tasks()["t"].version == 2
    assert store.put(artifacts[2]).manifest.version == 2  # sending it again is a retry, not a 409


def test_an_index_rewritten_within_one_timestamp_tick_still_changes_its_tag(tmp_path):
    """On ext4 with 128-byte inodes and many NFS servers mtime has one-second resolution and a rename
    frees an inode the next write reuses: inode, size and mtime then repeat. The tag must not."""
    objects = LocalObjects(tmp_path)
    objects.put("_index.json", b'{"generation": 1}')
    path = tmp_path / "_index.json"
    stat = os.stat(path)
    first = objects.tag("_index.json")
    with open(path, "r+b") as handle:  # same inode, same size, and the mtime set back: only content differs
        handle.write(b'{"generation": 3}')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_ino == stat.st_ino and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert objects.tag("_index.json") != first


def _predict(base: str, task: str) -> httpx.Response:
    return httpx.post(f"{base}/tasks/{task}/predict", files=[("images", ("a.png", png_bytes(1), "image/png"))])


def test_a_deleted_index_unregisters_nothing_and_is_rebuilt_by_an_admin(
    store_location, artifacts, backbone_file, resnet18
):
    kind, location = store_location
    store = TaskStore(location)
    store.put(artifacts[1])
    store.put(artifacts["u"])
    settings = server_settings(backbone_file, location, store_poll_s=0.05)
    with serve_in_thread(settings) as base:
        store.objects.delete(INDEX_KEY)  # an operator's mistake, or a restore that missed one file
        with pytest.raises(IndexMissing):
            store.read_index()
        deadline = time.monotonic() + 10
        while "store_problem" not in (ready := httpx.get(f"{base}/readyz").json()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "rebuild-index" in ready["store_problem"]
        assert _predict(base, "t").status_code == 200 and _predict(base, "u").status_code == 200
        refused = httpx.post(f"{base}/admin/tasks", files={"artifact": ("a", artifacts[2])}, headers=AUTH)
        assert refused.status_code == 503 and "rebuild" in refused.json()["detail"]
        assert TaskStore(location).objects.tag(INDEX_KEY) is None  # the refused write started no new index

        rebuilt = httpx.post(f"{base}/admin/store/rebuild-index", headers=AUTH)
        assert rebuilt.status_code == 200 and rebuilt.json()["tasks"] == 2
        assert set(store.live_tasks()) == {"t", "u"}
        assert httpx.post(f"{base}/admin/store/rebuild-index", headers=AUTH).status_code == 409
        assert (
            httpx.post(f"{base}/admin/tasks", files={"artifact": ("a", artifacts[2])}, headers=AUTH).status_code == 201
        )
        assert _predict(base, "t").json()["version"] == 2
        assert "store_problem" not in httpx.get(f"{base}/readyz").json()


@pytest.mark.slow  # a server process waiting on a damaged store: about 10 s
def test_a_damaged_index_at_start_up_is_waited_out_and_the_replica_becomes_ready(tmp_path, artifacts, backbone_file):
    store = TaskStore(tmp_path / "store")
    store.put(artifacts[1])
    good = (tmp_path / "store" / INDEX_KEY).read_bytes()
    (tmp_path / "store" / INDEX_KEY).write_bytes(b"{ damaged")
    process, port = start_service(tmp_path / "store", backbone_file, wait=False)
    base = f"http://127.0.0.1:{port}"
    try:
        answer = readiness_saying(base, "waiting for the store", process)
        assert answer is not None and answer.status_code == 503 and "damaged" in answer.json()["detail"]
        assert httpx.get(f"{base}/healthz").status_code == 200
        (tmp_path / "store" / INDEX_KEY).write_bytes(good)  # the operator repairs it
        wait_ready(base, timeout=30, process=process)
        assert _predict(base, "t").status_code == 200
    finally:
        stop_process(process, grace_s=30)


def test_a_registration_racing_its_own_store_poll_never_goes_back(store_location, backbone_file, resnet18):
    """Replica A's poll has read an index naming B's new task, and is loading it (slowly), when A registers
    a task of its own: afterwards A serves its task, at its version (before, the poll finished by
    unregistering it, and A answered 404 for a task it had just answered 201 for)."""
    location = store_location[1]
    other_replica = TaskStore(location)
    engine = Engine(server_settings(backbone_file, location), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    other_replica.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="from-b", seed=1)))
    loading, slow_load = threading.Event(), registry.store.load

    def load_slowly(live):
        loading.set()
        time.sleep(0.5)
        return slow_load(live)

    registry.store.load = load_slowly
    poll = threading.Thread(target=registry.sync_with_store)
    poll.start()
    assert loading.wait(10)  # the poll holds the index without A's task and is loading B's
    registered = registry.register(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="from-a", seed=2)))
    poll.join(10)
    assert registered.version == 1
    assert registry.task("from-a").version == 1 and registry.task("from-b").version == 1
    assert registry.sync_with_store() is True
    assert registry.task("from-a").version == 1


def test_unnamed_objects_are_swept_after_the_grace_period_and_named_ones_never(store_location, artifacts):
    store = TaskStore(store_location[1])
    store.put(artifacts[1])
    named = stored_keys(store)
    leftover = "t/00000002-0123456789abcdef.safetensors"  # a writer killed between its write and its publish
    store.objects.put(leftover, artifacts[2])
    assert store.sweep_unnamed(grace_s=3600) == []  # young: perhaps a publish under way
    assert stored_keys(store) == named | {leftover}
    time.sleep(1.1)
    assert store.sweep_unnamed(grace_s=1) == [leftover]
    assert stored_keys(store) == named and store.live_tasks()["t"].version == 1
