"""A replica on S3 whose network fails while a new version is published keeps serving the version it
has, counts the failed polls, and picks the new version up once the store is reachable again."""

from __future__ import annotations

import errno
import time
from urllib.parse import urlparse

import pytest
import torch

from mask_store import StoreUnavailable, TaskNotFound, TaskStore, artifact_bytes
from service.engine import Engine
from service.metrics import Metrics
from service.registry import TaskRegistry
from service.store_watcher import StoreWatcher
from tests.support.builders import random_task_artifact, server_settings
from tests.support.tcp_proxy import TcpProxy


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.02)


def test_a_replica_keeps_serving_through_a_store_outage_and_catches_up(s3_env, monkeypatch, backbone_file, resnet18):
    location = f"s3://{s3_env.bucket}/outage"
    writer = TaskStore(location)  # another replica, with a working network
    writer.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=1, seed=1)))
    target = urlparse(s3_env.endpoint)
    proxy = TcpProxy((target.hostname, target.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # this replica reaches S3 only through the proxy
    engine = Engine(server_settings(backbone_file, location), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    images = torch.randn(2, 3, 16, 16)
    before = engine.forward_task(registry.task("t"), images)

    writer.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=2, seed=2)))
    proxy.stop()  # the network fails
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        registry.sync_with_store()
    watcher = StoreWatcher(registry, interval_s=0.05)
    watcher.start()
    try:
        failed_polls = engine.metrics.store_sync_errors.labels(kind="StoreUnavailable")._value.get
        wait_for(lambda: failed_polls() >= 2, "the watcher retries and counts each failed poll")
        assert registry.task("t").version == 1 and registry.failed == {}
        assert torch.equal(engine.forward_task(registry.task("t"), images), before)

        restored = TcpProxy((target.hostname, target.port), port=proxy.port)  # the network comes back
        try:
            wait_for(lambda: registry.task("t").version == 2, "version 2 served once the store is back")
        finally:
            restored.stop()
    finally:
        watcher.stop()
    assert not torch.equal(engine.forward_task(registry.task("t"), images), before)


def test_an_io_error_while_loading_a_new_version_is_retried_not_a_failed_version(
    tmp_path, monkeypatch, backbone_file, resnet18
):
    """One EIO reading v2 from a directory store: this replica keeps v1, then serves v2 at the next poll
    (before, v2 was marked failed for good on this replica while the others served it)."""
    store = TaskStore(tmp_path / "store")
    store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=1, seed=1)))
    engine = Engine(server_settings(backbone_file, tmp_path / "store"), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=2, seed=2)))
    objects = type(registry.store.objects)
    real_get_tagged = objects.get_tagged
    failures = []

    def get_tagged_failing_once(self, key):
        if key.startswith("t/") and not failures:
            failures.append(key)
            raise OSError(errno.EIO, "Input/output error", key)
        return real_get_tagged(self, key)

    monkeypatch.setattr(objects, "get_tagged", get_tagged_failing_once)
    assert registry.sync_with_store() is False  # not fully applied: to be retried
    assert failures and [t.version for t in registry.tasks()] == [1] and registry.failed == {}
    assert registry.sync_with_store() is True
    assert registry.task("t").version == 2 and registry.failed == {}


def test_a_failed_task_is_unlisted_once_the_store_no_longer_names_it(tmp_path, backbone_file, resnet18):
    from tests.service.test_versions_and_poison_artifacts import _poison

    store = TaskStore(tmp_path / "store")
    store.put(_poison(resnet18, "negative-bn-variance"))  # another replica's bug: stored without its proof
    engine = Engine(server_settings(backbone_file, tmp_path / "store"), Metrics())
    registry = TaskRegistry.over_store_of(engine)
    registry.sync_with_store()
    assert "poison" in registry.failed
    store.delete("poison")  # unregistered by another replica
    assert registry.sync_with_store() is True
    assert registry.failed == {}
    with pytest.raises(TaskNotFound, match="no task named"):
        registry.task("poison")
