"""The task-weight cache (LRU under a byte budget) and the engine's kernel choice, end to end in-process."""

from __future__ import annotations

import torch

from mask_store import TaskStore, artifact_bytes
from service.cache import TaskWeightCache
from service.engine import Engine
from service.metrics import Metrics
from tests.conftest import random_task_artifact, server_settings
from tests.reference_model import dedicated_network


def test_lru_evicts_least_recently_used_within_budget():
    events = []
    cache = TaskWeightCache(budget_bytes=2 * 400, on_event=events.append)  # room for two 100-float buffers
    make = lambda value: lambda: torch.full((100,), float(value))  # noqa: E731
    cache.get_or_create("a", make(1))
    cache.get_or_create("b", make(2))
    assert cache.get_or_create("a", make(9))[0] == 1  # hit: "a" is now the most recent
    cache.get_or_create("c", make(3))  # evicts "b"
    assert "a" in cache and "c" in cache and "b" not in cache
    assert events == ["miss", "miss", "hit", "miss", "evict"]
    assert cache.used_bytes == 800
    cache.discard(lambda key: key == "a")
    assert "a" not in cache


def test_zero_budget_applies_every_time():
    events = []
    cache = TaskWeightCache(budget_bytes=0, on_event=events.append)
    for _ in range(3):
        cache.get_or_create("a", lambda: torch.ones(10))
    assert events == ["miss"] * 3 and cache.used_bytes == 0


def engine_for(tmp_path, backbone_file, artifacts, **settings):
    store = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
    for artifact in artifacts:
        TaskStore(store).put(artifact_bytes(artifact))
    engine = Engine(server_settings(backbone_file, store, **settings), Metrics())
    engine.load_store()
    return engine


def test_every_kernel_and_cache_setting_gives_the_dedicated_network_answer(tmp_path, backbone_file, resnet18):
    artifacts = [
        random_task_artifact(resnet18, "resnet18", task="bin", seed=21),
        random_task_artifact(resnet18, "resnet18", task="ter", seed=22, kind="ternary"),
    ]
    images = torch.randn(3, 3, 16, 16)
    for kernel in ("torch", "cpu"):
        for budget in (0, 1024):
            engine = engine_for(tmp_path, backbone_file, artifacts, kernel=kernel, cache_budget_mb=budget)
            assert engine.kernel_name == kernel
            for artifact in artifacts:
                with torch.no_grad():
                    expected = torch.softmax(dedicated_network(resnet18, artifact)(images), dim=1)
                for _ in range(2):
                    got = engine.forward_task(engine.task(artifact.manifest.task), images)
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            events = {
                s.labels["event"]: s.value
                for m in engine.metrics.cache_events.collect()
                for s in m.samples
                if s.name.endswith("_total")
            }
            if budget == 0:
                assert events.get("miss") == 4 and "hit" not in events
            else:
                assert events.get("miss") == 2 and events.get("hit") == 2


def test_backbone_weights_are_never_written(tmp_path, backbone_file, resnet18):
    engine = engine_for(
        tmp_path, backbone_file, [random_task_artifact(resnet18, "resnet18", task="x", seed=3)], cache_budget_mb=0
    )
    before = {k: v.clone() for k, v in engine.backbone.state_dict().items()}
    flat_before = engine.flat_weights.clone()
    engine.forward_task(engine.task("x"), torch.randn(2, 3, 16, 16))
    assert torch.equal(engine.flat_weights, flat_before)
    for key, value in engine.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
