"""The task-weight cache (LRU under a byte budget) and the engine's kernel choice, end to end in-process."""

from __future__ import annotations

import torch

from mask_store import TaskStore, artifact_bytes
from service.cache import TaskWeightCache
from service.engine import Engine
from service.metrics import Metrics
from service.registry import TaskRegistry
from tests.support.builders import random_task_artifact, server_settings
from tests.support.reference_model import dedicated_network

LIKE = torch.empty(100)  # every buffer has the backbone's flat-weight size: here 100 floats, 400 bytes


def filler(value: float):
    return lambda out: out.fill_(value)


def test_lru_evicts_least_recently_used_within_budget():
    events = []
    cache = TaskWeightCache(budget_bytes=2 * 400, on_event=events.append)  # room for two buffers
    cache.get_or_fill("a", LIKE, filler(1))
    cache.get_or_fill("b", LIKE, filler(2))
    assert cache.get_or_fill("a", LIKE, filler(9))[0] == 1  # hit: "a" is now the most recent
    assert cache.get_or_fill("c", LIKE, filler(3))[0] == 3  # evicts "b"
    assert "a" in cache and "c" in cache and "b" not in cache
    assert events == ["miss", "allocate", "miss", "allocate", "hit", "miss", "evict"]
    assert cache.used_bytes == 800
    cache.discard(lambda key: key == "a")
    assert "a" not in cache


def test_misses_reuse_the_pool_and_never_allocate_past_the_budget():
    cache = TaskWeightCache(budget_bytes=3 * 400 + 399)  # three buffers fit, a fourth does not
    buffers = {id(cache.get_or_fill(key, LIKE, filler(key))) for key in range(50)}
    assert cache.allocated == 3 and len(buffers) == 3
    assert [cache.get_or_fill(key, LIKE, filler(-1))[0] for key in (47, 48, 49)] == [47, 48, 49]
    cache.discard(lambda key: key == 48)  # a freed buffer is reused before any eviction
    assert cache.get_or_fill("new", LIKE, filler(7))[0] == 7
    assert 47 in cache and 49 in cache and cache.allocated == 3


def test_a_buffer_not_admitted_goes_back_to_the_pool():
    cache = TaskWeightCache(budget_bytes=400)
    assert cache.get_or_fill("retired", LIKE, filler(5), admit=lambda: False)[0] == 5
    assert "retired" not in cache
    assert cache.get_or_fill("live", LIKE, filler(6))[0] == 6 and cache.allocated == 1


def test_zero_budget_applies_every_time():
    events = []
    cache = TaskWeightCache(budget_bytes=0, on_event=events.append)
    for _ in range(3):
        assert cache.get_or_fill("a", LIKE, filler(1)) is None  # the engine applies into scratch memory
    assert events == ["miss"] * 3 and cache.used_bytes == 0


def engine_for(tmp_path, backbone_file, artifacts, **settings):
    store = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
    for artifact in artifacts:
        TaskStore(store).put(artifact_bytes(artifact))
    engine = Engine(server_settings(backbone_file, store, **settings), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    return engine, registry


def test_every_kernel_and_cache_setting_gives_the_dedicated_network_answer(tmp_path, backbone_file, resnet18):
    artifacts = [
        random_task_artifact(resnet18, "resnet18", task="bin", seed=21),
        random_task_artifact(resnet18, "resnet18", task="ter", seed=22, kind="ternary"),
    ]
    images = torch.randn(3, 3, 16, 16)
    for kernel in ("torch", "cpu"):
        for budget in (0, 1024):
            engine, registry = engine_for(tmp_path, backbone_file, artifacts, kernel=kernel, cache_budget_mb=budget)
            assert engine.kernel_name == kernel
            for artifact in artifacts:
                with torch.no_grad():
                    expected = torch.softmax(dedicated_network(resnet18, artifact)(images), dim=1)
                for _ in range(2):
                    got = engine.forward_task(registry.task(artifact.manifest.task), images)
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
    engine, registry = engine_for(
        tmp_path, backbone_file, [random_task_artifact(resnet18, "resnet18", task="x", seed=3)], cache_budget_mb=0
    )
    before = {k: v.clone() for k, v in engine.backbone.state_dict().items()}
    flat_before = engine.flat_weights.clone()
    engine.forward_task(registry.task("x"), torch.randn(2, 3, 16, 16))
    assert torch.equal(engine.flat_weights, flat_before)
    for key, value in engine.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
