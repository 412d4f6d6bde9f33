"""Registered is not resident: with PIGGYBACK_PRELOAD=pinned a replica reads the index at start-up and
loads a task on its first request, shares one load among concurrent first requests, keeps the resident
tasks within PIGGYBACK_RESIDENT_BUDGET_MB (least recently used unloaded), and answers exactly as a
replica that loaded everything. Through a real server on a real store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

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


@pytest.mark.slow  # two servers, eager then lazy
def test_cold_tasks_load_on_first_use_within_the_resident_budget(tmp_path, backbone_file, resnet18):
    store = TaskStore(tmp_path / "store")
    for seed, name in enumerate(NAMES):
        store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=name, seed=seed)))
    store.put(_poison(resnet18, "negative-bn-variance"))  # stored without a proof by an older server
    eager = server_settings(backbone_file, tmp_path / "store")
    with serve_in_thread(eager) as base:
        expected = {name: predict(base, name).json() for name in NAMES}

    lazy = server_settings(  # no recently used tasks preloaded: the eager server recorded all four
        backbone_file, tmp_path / "store", preload="pinned", pinned_tasks="a", preload_recent=0,
        resident_budget_mb=2 * TASK_MB,
    )  # fmt: skip
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


def test_the_proof_forward_runs_once_at_registration_and_never_on_another_replica(tmp_path, backbone_file, resnet18):
    """A task a server registered is marked proved in the index: another replica checks its identity and
    backbone on load and runs no proof; one stored by `put` (`train --out`) is proved by the replica
    that loads it first."""
    settings = server_settings(backbone_file, tmp_path / "store", preload="pinned")
    registering, loading = (TaskRegistry.over_store_of(Engine(settings, Metrics())) for _ in range(2))
    proofs: dict[int, list[str]] = {id(registering): [], id(loading): []}
    for registry in (registering, loading):
        forward, seen = registry.engine.forward_task, proofs[id(registry)]

        def spy(task, images, prove=False, forward=forward, seen=seen):
            if prove:
                seen.append(task.name)
            return forward(task, images, prove=prove)

        registry.engine.forward_task = spy
    registering.register(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="registered", seed=1)))
    registering.store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="put", seed=2)))
    assert proofs[id(registering)] == ["registered"]

    loading.sync_with_store()
    registering.sync_with_store()
    assert loading.registered()["registered"].proven and not loading.registered()["put"].proven
    image = torch.rand(1, 3, 16, 16)
    for name in ("registered", "put"):
        task = loading.task(name)
        torch.testing.assert_close(
            loading.engine.forward_task(task, image), registering.engine.forward_task(registering.task(name), image)
        )
    assert proofs[id(loading)] == ["put"]  # and the registering replica proved "put" on its own first load


def test_a_task_evicted_from_the_device_loads_again_from_host_memory(tmp_path, backbone_file, resnet18):
    """The host tier keeps verified artifacts within PIGGYBACK_HOST_BUDGET_MB: a task the device tier
    evicted (PIGGYBACK_RESIDENT_BUDGET_MB) comes back without a store read, and least recently used
    artifacts go beyond the budget. Every eviction is told to the unload listeners (Ray Serve's routing)."""
    made = [random_task_artifact(resnet18, "resnet18", task=name, seed=i) for i, name in enumerate(NAMES)]
    artifacts = [artifact_bytes(artifact) for artifact in made]
    reference = TaskRegistry.over_store_of(Engine(server_settings(backbone_file, tmp_path / "reference"), Metrics()))
    image = torch.rand(1, 3, 16, 16)
    expected = {}
    for name, data in zip(NAMES, artifacts, strict=True):
        task = reference.register(data)
        expected[name] = reference.engine.forward_task(task, image)
    one_task_mb = task.nbytes / 2**20
    one_artifact_mb = len(artifacts[0]) * 2.2 / 2**20  # decoded and stored planes, BN and head
    settings = server_settings(
        backbone_file, tmp_path / "store", preload="pinned",
        resident_budget_mb=1.5 * one_task_mb, host_budget_mb=2 * one_artifact_mb,
    )  # fmt: skip
    registry = TaskRegistry.over_store_of(Engine(settings, Metrics()))
    unloaded: list[str] = []
    registry.on_unload(unloaded.append)
    for data in artifacts:
        registry.register(data)
    assert [t.name for t in registry.tasks()] == ["d"] and unloaded == ["a", "b", "c"]  # one fits the device
    reads: list[str] = []
    load = registry.store.load
    registry.store.load = lambda live: reads.append(live.name) or load(live)

    for name in ("d", "c", "b", "a"):  # "d" resident; "c" in host memory; "b" and "a" read from the store
        torch.testing.assert_close(registry.engine.forward_task(registry.task(name), image), expected[name])
    assert reads == ["b", "a"]
    assert unloaded == ["a", "b", "c", "d", "c", "b"]
    assert registry.metrics.host_tier_hits._value.get() == 1
    assert registry.metrics.host_tier_tasks._value.get() == 2  # "b" and "a" now, "d" and "c" dropped

    registry.unregister("a")
    assert registry.metrics.host_tier_tasks._value.get() == 1
    assert unloaded[-1] == "a"


@pytest.mark.slow  # three server lifetimes
def test_a_restart_loads_the_most_recently_used_tasks_before_its_first_request(tmp_path, backbone_file, resnet18):
    """A server records its most recently used tasks in the store (every minute, and when it stops);
    the next start-up loads them with the pinned ones, within PIGGYBACK_PRELOAD_RECENT and the budget."""
    store = TaskStore(tmp_path / "store")
    for seed, name in enumerate(NAMES):
        store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=name, seed=seed)))
    lazy = dict(preload="pinned", preload_recent=2)
    with serve_in_thread(server_settings(backbone_file, tmp_path / "store", **lazy)) as base:
        for name in ("d", "b", "c"):
            assert predict(base, name).status_code == 200
    assert store.recent_tasks() == ["c", "b"]  # recorded at shutdown, most recent first

    with serve_in_thread(server_settings(backbone_file, tmp_path / "store", **lazy)) as base:
        listed = {task["name"]: task["resident"] for task in httpx.get(f"{base}/tasks").json()}
        assert listed == {"a": False, "b": True, "c": True, "d": False}
    store.objects.put("_recent.json", b"{not json")  # a damaged record is ignored, never a failed start
    with serve_in_thread(server_settings(backbone_file, tmp_path / "store", **lazy)) as base:
        assert not any(task["resident"] for task in httpx.get(f"{base}/tasks").json())
