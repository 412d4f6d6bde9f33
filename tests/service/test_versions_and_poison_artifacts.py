"""Regression tests for the serving/store defects of issue 14, through the real server.

Stale weights after re-registration, older versions going live, poison artifacts taking the service
down, read-only stores, and store folders named unlike their task.
"""

from __future__ import annotations

import io
import threading

import httpx
import pytest
import torch
from PIL import Image

from mask_store import BackboneLayout, TaskStore, artifact_bytes, make_artifact
from tests.store.test_artifacts import edit_manifest
from tests.store.test_store_rules import mounted
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.reference_model import dedicated_network, expected_probabilities
from tests.support.servers import metric, png_bytes, serve_in_thread, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGE = png_bytes(seed=5)


def predict(base: str, task: str) -> httpx.Response:
    return httpx.post(f"{base}/tasks/{task}/predict", files=[("images", ("x.png", IMAGE, "image/png"))], timeout=60)


def register(base: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base}/admin/tasks", files={"artifact": ("a.safetensors", data)}, headers=AUTH, timeout=120)


def reference(resnet18, artifact) -> list[float]:
    model = dedicated_network(resnet18, artifact)
    return expected_probabilities(model, artifact, [Image.open(io.BytesIO(IMAGE))])[0].tolist()


def scores(response: httpx.Response) -> list[float]:
    """The full probability vector, ordered by class index (top_k covers every class here)."""
    assert response.status_code == 200, response.text
    ranked = response.json()["predictions"][0]["top_k"]
    return [entry["score"] for entry in sorted(ranked, key=lambda entry: entry["index"])]


@pytest.mark.slow
def test_reregistering_a_name_and_version_never_serves_the_old_masks(tmp_path, backbone_file, resnet18):
    old = random_task_artifact(resnet18, "resnet18", task="t", seed=1)
    new = random_task_artifact(resnet18, "resnet18", task="t", seed=2)  # same name and version, other masks
    TaskStore(tmp_path).put(artifact_bytes(old))
    settings = server_settings(backbone_file, tmp_path, max_batch_delay_ms=2500.0)
    with serve_in_thread(settings) as base:
        queued = {}
        thread = threading.Thread(target=lambda: queued.update(response=predict(base, "t")))
        thread.start()  # waits 2.5 s in the batcher while the task is replaced under it
        wait_until(lambda: metric(base, "piggyback_queued_images") == 1)  # queued before the DELETE is sent
        assert httpx.delete(f"{base}/admin/tasks/t", headers=AUTH, timeout=60).status_code == 204
        assert register(base, artifact_bytes(new)).status_code == 201
        thread.join()
        torch.testing.assert_close(scores(queued["response"]), reference(resnet18, old), rtol=1e-4, atol=1e-5)
        for _ in range(2):
            torch.testing.assert_close(scores(predict(base, "t")), reference(resnet18, new), rtol=1e-4, atol=1e-5)


def test_only_the_highest_version_goes_live_and_stays_live_after_restart(tmp_path, backbone_file, resnet18):
    made = {
        v: artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", version=v, seed=v)) for v in (1, 2, 3)
    }
    settings = server_settings(backbone_file, tmp_path)
    with serve_in_thread(settings) as base:
        assert register(base, made[2]).status_code == 201
        refused = register(base, made[1])
        assert refused.status_code == 409 and "not higher than its live version 2" in refused.json()["detail"]
        assert httpx.get(f"{base}/tasks/t").json()["version"] == 2
        assert register(base, made[3]).status_code == 201
        assert httpx.get(f"{base}/tasks/t").json()["version"] == 3
    with serve_in_thread(settings) as base:  # a restart serves what was live
        assert httpx.get(f"{base}/tasks/t").json()["version"] == 3
        assert predict(base, "t").json()["version"] == 3


def _poison(resnet18, kind: str) -> bytes:
    artifact = random_task_artifact(resnet18, "resnet18", task="poison", version=2, seed=7)
    if kind == "negative-bn-variance":  # finite, well-formed, and every forward gives NaN
        tensors = dict(artifact.task_tensors)
        tensors["bn1.running_var"] = -torch.ones_like(tensors["bn1.running_var"])
        return artifact_bytes(
            make_artifact(
                layout=BackboneLayout.from_model("resnet18", resnet18),
                masks=artifact.masks(),
                kind="binary",
                threshold=5e-3,
                task="poison",
                version=2,
                labels=list(artifact.manifest.labels),
                task_tensors=tensors,
                preprocess=artifact.manifest.preprocess,
            )
        )
    data = artifact_bytes(artifact)
    if kind == "zero-std":
        return edit_manifest(data, lambda m: m["preprocess"].update(std=[0.5, 0.0, 0.5]))
    if kind == "integer-head":
        artifact.task_tensors["fc.weight"] = artifact.task_tensors["fc.weight"].to(torch.int64)
    if kind == "non-finite-head":
        artifact.task_tensors["fc.bias"][0] = float("nan")
    return _raw_artifact(artifact)


def _raw_artifact(artifact) -> bytes:
    """Serialize tensors as they are, with checksums that match, bypassing make_artifact's casts."""
    from mask_store.artifact import TASK_PREFIX, _sha256

    checksums = dict(artifact.manifest.checksums)
    for name, tensor in artifact.task_tensors.items():
        checksums[TASK_PREFIX + name] = _sha256(tensor)
    manifest = artifact.manifest.model_copy(update={"checksums": checksums})
    return artifact_bytes(type(artifact)(manifest, artifact.planes, artifact.stored, artifact.task_tensors))


POISONS = ("negative-bn-variance", "zero-std", "integer-head", "non-finite-head")


@pytest.fixture(scope="module")
def poison_server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    good = random_task_artifact(resnet18, "resnet18", task="poison", seed=3)
    TaskStore(store).put(artifact_bytes(good))
    with serve_in_thread(server_settings(backbone_file, store)) as base:
        yield base, store, reference(resnet18, good)


@pytest.mark.parametrize("kind", POISONS)
def test_a_poison_artifact_is_refused_and_the_previous_version_keeps_serving(poison_server, resnet18, kind):
    base, store, expected = poison_server
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    response = register(base, _poison(resnet18, kind))
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    torch.testing.assert_close(scores(predict(base, "poison")), expected, rtol=1e-4, atol=1e-5)
    assert httpx.get(f"{base}/readyz").status_code == 200


def test_a_poison_artifact_already_in_the_store_is_skipped_at_start(tmp_path, backbone_file, resnet18):
    TaskStore(tmp_path).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="good", seed=4)))
    TaskStore(tmp_path).put(_poison(resnet18, "negative-bn-variance"))  # stored by an older server, unproven
    with serve_in_thread(server_settings(backbone_file, tmp_path)) as base:
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["tasks"] == 1 and "non-finite" in ready["failed_tasks"]["poison"]
        listed = {entry["name"]: entry for entry in httpx.get(f"{base}/tasks").json()}
        assert listed["good"]["status"] == "serving" and listed["poison"]["status"] == "failed"
        assert "non-finite" in listed["poison"]["error"]
        assert predict(base, "good").status_code == 200
        missing = predict(base, "poison")
        assert missing.status_code == 404 and "cannot serve it" in missing.json()["detail"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'piggyback_task_load_failures_total{kind="CorruptArtifact"} 1.0' in metrics


def test_a_folder_named_unlike_its_task_is_reported_and_can_be_deleted(tmp_path, backbone_file, resnet18):
    (tmp_path / "renamed").mkdir()
    data = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="t", seed=6))
    (tmp_path / "renamed" / "00000001.safetensors").write_bytes(data)  # a pre-index store, folder renamed by hand
    with serve_in_thread(server_settings(backbone_file, tmp_path)) as base:
        ready = httpx.get(f"{base}/readyz").json()
        assert "holds task 't'" in ready["failed_tasks"]["renamed"]
        assert predict(base, "t").status_code == 404
        assert httpx.delete(f"{base}/admin/tasks/renamed", headers=AUTH, timeout=60).status_code == 204
        assert httpx.get(f"{base}/readyz").json()["failed_tasks"] == {}
    assert not (tmp_path / "renamed").exists()


def test_a_read_only_store_with_dot_files_serves(tmp_path, backbone_file, resnet18):
    source = tmp_path / "source"
    artifact = random_task_artifact(resnet18, "resnet18", task="t", seed=8)
    TaskStore(source).put(artifact_bytes(artifact))
    (source / ".keep").write_text("")
    (source / ".git").mkdir()
    with mounted("ro", source, tmp_path / "ro") as root:
        with serve_in_thread(server_settings(backbone_file, root)) as base:
            torch.testing.assert_close(scores(predict(base, "t")), reference(resnet18, artifact), rtol=1e-4, atol=1e-5)
            refused = register(base, artifact_bytes(random_task_artifact(resnet18, "resnet18", task="u", seed=9)))
            assert refused.status_code == 503 and "read-only" in refused.json()["detail"]
            assert httpx.delete(f"{base}/admin/tasks/t", headers=AUTH).status_code == 503
            assert predict(base, "t").status_code == 200
    assert (source / ".keep").exists() and (source / ".git").is_dir()
