"""Registered is not resident: with PIGGYBACK_PRELOAD=pinned a replica reads the index at start-up and
loads a task on its first request, shares one load among concurrent first requests, keeps the resident
tasks within PIGGYBACK_RESIDENT_BUDGET_MB (least recently used unloaded), and answers exactly as a
replica that loaded everything. Through a real server on a real store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mask_store import TaskStore, artifact_bytes
from service.engine import Engine
from service.metrics import Metrics
from service.registry import TaskRegistry
from tests.service.test_versions_and_poison_artifacts import _poison
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import metric, png_bytes, serve_in_thread

NAMES = ["a", "b", "c", "d"]
TASK_MB = 1.5  # a resnet18 task's masks, BN and head on the device: about 1.41 MiB


def predict(base: str, name: str) -> httpx.Response:
    return httpx.post(f"{base}/tasks/{name}/predict", files=[("images", ("x.png", png_bytes(3), "image/png"))])


def same_answer(got: dict, expected: dict) -> bool:
    """The same task, version and ranking, scores equal within 1e-5 (batches of other sizes round differently)."""
    top, want = got["predictions"][0]["top_k"], expected["predictions"][0]["top_k"]
    return (
        (got["task"], got["version"]) == (expected["task"], expected["version"])
        and [s["index"] for s in top] == [s["index"] for s in want]
        and all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(top, want, strict=True))
    )


def test_cold_tasks_load_on_first_use_within_the_resident_budget(tmp_path, backbone_file, resnet18):
    store = TaskStore(tmp_path / "store")
    for seed, name in enumerate(NAMES):
        store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=name, seed=seed)))
    store.put(_poison(resnet18, "negative-bn-variance"))  # stored without a proof by an older server
    eager = server_settings(backbone_file, tmp_path / "store")
    with serve_in_thread(eager) as base:
        expected = {name: predict(base, name).json() for name in NAMES}

    lazy = server_settings(
        backbone_file, tmp_path / "store", preload="pinned", pinned_tasks="a", resident_budget_mb=2 * TASK_MB
    )
    with serve_in_thread(lazy) as base:
        listed = {task["name"]: task for task in httpx.get(f"{base}/tasks").json()}
        assert listed["a"]["status"] == "serving" and listed["a"]["resident"] is True
        assert {listed[n]["status"] for n in ("b", "c", "d", "poison")} == {"registered"}
        described = httpx.get(f"{base}/tasks/b").json()  # from the stored artifact, without loading it
        assert described["resident"] is False and described["labels"] == ["a", "b", "c"]
        assert metric(base, "piggyback_resident_tasks") == 1

        loads = metric(base, "piggyback_cold_load_seconds_count")  # the pinned task's, at start-up
        with ThreadPoolExecutor(8) as pool:  # eight first requests for one cold task: one load
            answers = list(pool.map(lambda _: predict(base, "b"), range(8)))
        assert {r.status_code for r in answers} == {200}
        assert metric(base, "piggyback_cold_load_seconds_count") == loads + 1
        assert all(same_answer(r.json(), expected["b"]) for r in answers)

        for name in ("c", "d", "b", "a"):  # beyond the budget of two: least recently used unloaded, "a" pinned
            assert same_answer(predict(base, name).json(), expected[name])
        assert metric(base, "piggyback_resident_tasks") <= 2
        assert metric(base, "piggyback_resident_evictions_total") >= 2
        assert httpx.get(f"{base}/tasks/a").json()["resident"] is True

        refused = predict(base, "poison")  # found bad on first use: 404 with the reason, listed as failed
        assert refused.status_code == 404 and "non-finite" in refused.json()["detail"]
        assert httpx.get(f"{base}/readyz").json()["failed_tasks"].keys() == {"poison"}


def test_a_task_dropped_from_ray_serves_lru_is_unloaded_once(tmp_path, backbone_file, resnet18):
    """Serve's multiplexed LRU and the registry's resident set are one: Serve dropping a task unloads it
    (pinned ones stay), and the garbage collector's later call does not unload it again."""
    pytest.importorskip("ray")
    from service.ray_serve import HeldTask

    store = TaskStore(tmp_path / "store")
    for name in ("a", "pinned"):
        store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=name, seed=len(name))))
    engine = Engine(server_settings(backbone_file, tmp_path / "store", pinned_tasks="pinned"), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    assert {t.name for t in registry.tasks()} == {"a", "pinned"}
    held, kept = HeldTask(registry, "a"), HeldTask(registry, "pinned")
    held.__del__()  # Serve drops "a" from its LRU
    kept.__del__()
    assert {t.name for t in registry.tasks()} == {"pinned"}
    reloaded = registry.task("a")  # its next request loads it again
    del held  # the collector finalizes the dropped handle: "a" stays resident
    assert registry.resident_task("a") is reloaded
