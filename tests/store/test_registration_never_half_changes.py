"""Registration never leaves the store half-changed: an activation that fails is rolled back, and a
writer killed with SIGKILL at random moments while storing a vgg16-size artifact leaves the old or
the new version, complete, and a service that starts."""

from __future__ import annotations

import contextlib
import random
import time

import httpx
import pytest
import torch

from mask_store import TaskStore, artifact_bytes, build_backbone
from mask_store.manifest import Preprocess
from mask_store.synthetic import random_task_artifact
from service.app import create_app
from tests.store.test_artifacts import edit_manifest
from tests.store.test_store_rules import visible
from tests.support.builders import ADMIN_TOKEN, server_settings
from tests.support.forked import forked_processes
from tests.support.servers import png_bytes, serve_in_thread, service_process

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.allow_server_errors
def test_an_activation_failure_restores_the_store_and_keeps_the_previous_version(tmp_path, backbone_file, resnet18):
    store = TaskStore(tmp_path)
    store.put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=1, seed=1)))
    before = {key: value for key, value in visible(store).items() if key != "_index.json"}
    app = create_app(server_settings(backbone_file, tmp_path))
    with serve_in_thread(app.state.settings, app=app) as base:
        registry = app.state.registry
        real_install = registry._install

        def failing_install(task, allow_older):
            if task.version == 2:
                raise RuntimeError("device out of memory while activating")
            return real_install(task, allow_older)

        registry._install = failing_install
        upload = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=2, seed=2))
        response = httpx.post(f"{base}/admin/tasks", files={"artifact": ("t.safetensors", upload)}, headers=AUTH)
        assert response.status_code == 500 and "detail" in response.json()
        assert httpx.get(f"{base}/tasks/t").json()["version"] == 1
        predicted = httpx.post(f"{base}/tasks/t/predict", files=[("images", ("x.png", png_bytes(1), "image/png"))])
        assert predicted.status_code == 200 and predicted.json()["version"] == 1
        registry._install = real_install
        registry.sync_with_store()  # the watcher's view agrees: version 1 is what the store names
        assert registry.task("t").version == 1
    assert {key: value for key, value in visible(store).items() if key != "_index.json"} == before
    assert TaskStore(tmp_path).versions("t") == [1]


def _put(root, upload, started) -> None:
    """The writer: a separate process storing `upload`; `started` is set once the put is under way."""
    data = upload.read_bytes()
    store = TaskStore(root)
    started.set()
    store.put(data)


FORKS = forked_processes()  # each SIGKILL trial costs a fork, not an interpreter start


def _with_version(data: bytes, version: int) -> bytes:
    """The same artifact under another version: only the manifest in the header changes."""
    return edit_manifest(data, lambda manifest: manifest.update(version=version))


@contextlib.contextmanager
def _writer(root, upload):
    """A process storing `upload`, yielded once its put is under way; SIGKILLed on the way out."""
    started = FORKS.Event()
    writer = FORKS.Process(target=_put, args=(root, upload, started), daemon=True)
    writer.start()
    try:
        assert started.wait(timeout=120), "the writer never started"
        yield writer
    finally:
        writer.kill()
        writer.join()


def _timed_put(root, upload) -> float:
    with _writer(root, upload) as writer:
        started = time.monotonic()
        writer.join(timeout=120)
        assert writer.exitcode == 0
    return time.monotonic() - started


@pytest.mark.slow
def test_sigkill_at_random_moments_while_storing_a_vgg16_artifact(tmp_path):
    torch.manual_seed(0)
    vgg16 = build_backbone("vgg16")
    size = Preprocess(size=32, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    # density 0.5: bits that do not compress (zlib would take seconds on 138M of them and save nothing)
    data = artifact_bytes(random_task_artifact(vgg16, "vgg16", task="big", version=1, preprocess=size, density=0.5))
    weights = tmp_path / "vgg16.pt"
    torch.save(vgg16.state_dict(), weights)
    del vgg16
    root, upload = tmp_path / "store", tmp_path / "upload.safetensors"
    TaskStore(root).put(data)
    rng = random.Random(0)
    upload.write_bytes(_with_version(data, 2))
    duration = _timed_put(root, upload)  # one complete put, to spread the kills over its length
    outcomes = []
    for trial in range(10):
        version = trial + 3
        upload.write_bytes(_with_version(data, version))
        with _writer(root, upload):  # the put is under way
            time.sleep(rng.uniform(0.0, 1.3 * duration))  # before, during or after the publish; then killed
        store = TaskStore(root)
        live = store.get("big")  # the live version loads completely: every checksum holds
        assert live.manifest.version in (version - 1, version)
        assert store.versions("big")[-1] == live.manifest.version
        outcomes.append(live.manifest.version == version)
        if not outcomes[-1]:  # the kill came before publishing: publish this version now for the next trial
            store.put(_with_version(data, version))
    assert len(outcomes) == 10
    print(f"kills after publishing: {sum(outcomes)} of {len(outcomes)}")  # both kinds of moment, typically
    env = {
        "PIGGYBACK_BACKBONE": "vgg16",
        "PIGGYBACK_WEIGHTS": str(weights),
        "PIGGYBACK_STORE": str(root),
        "PIGGYBACK_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with service_process(env, timeout=300) as base:
        assert httpx.get(f"{base}/readyz", timeout=60).json()["failed_tasks"] == {}
        image = [("images", ("x.png", png_bytes(2), "image/png"))]
        answer = httpx.post(f"{base}/tasks/big/predict", files=image, timeout=300)
        assert answer.status_code == 200 and answer.json()["version"] == 12
