"""Registering, replacing and removing tasks while other tasks serve a stream of concurrent requests."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.reference_model import dedicated_network, expected_probabilities
from tests.support.servers import png_bytes, serve_in_thread

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.slow  # seconds of load
def test_hot_swaps_under_load_lose_nothing_and_never_mix_tasks(tmp_path, backbone_file, resnet18):
    versions = {
        ("alpha", 1): random_task_artifact(resnet18, "resnet18", task="alpha", labels=("a", "b", "c"), seed=11),
        ("alpha", 2): random_task_artifact(
            resnet18, "resnet18", task="alpha", labels=("a", "b", "c"), seed=12, version=2
        ),
        ("beta", 1): random_task_artifact(resnet18, "resnet18", task="beta", labels=("p", "q"), seed=13),
        ("gamma", 1): random_task_artifact(resnet18, "resnet18", task="gamma", labels=("u", "v", "w", "x"), seed=14),
    }
    image = png_bytes(seed=99)
    expected = {
        key: expected_probabilities(dedicated_network(resnet18, a), a, [Image.open(io.BytesIO(image))])[0]
        for key, a in versions.items()
    }
    store = tmp_path / "store"
    TaskStore(store).put(artifact_bytes(versions[("alpha", 1)]))
    TaskStore(store).put(artifact_bytes(versions[("beta", 1)]))
    settings = server_settings(backbone_file, store, cache_budget_mb=0)  # every request applies its mask

    failures: list[str] = []
    answered = {"alpha": 0, "beta": 0}
    stop = threading.Event()

    def stream(task: str) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                response = client.post(
                    f"{base}/tasks/{task}/predict",
                    files=[("images", ("i.png", image, "image/png"))],
                    params={"top_k": 4},
                )
                if response.status_code != 200:
                    failures.append(f"{task}: {response.status_code} {response.text}")
                    continue
                body = response.json()
                got = torch.zeros(len(expected[(task, body["version"])]))
                for item in body["predictions"][0]["top_k"]:
                    got[item["index"]] = item["score"]
                if not torch.allclose(got, expected[(task, body["version"])], rtol=1e-4, atol=1e-5):
                    failures.append(f"{task} v{body['version']}: answer of another task {got.tolist()}")
                answered[task] += 1

    with serve_in_thread(settings) as base, ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(stream, task) for task in ("alpha", "beta", "alpha", "beta")]
        time.sleep(1.0)
        with httpx.Client(timeout=120, headers=AUTH) as admin:
            for _round in range(3):
                r = admin.post(f"{base}/admin/tasks", files={"artifact": ("g", artifact_bytes(versions[("gamma", 1)]))})
                assert r.status_code == 201, r.text
                g = admin.post(f"{base}/tasks/gamma/predict", files=[("images", ("i.png", image, "image/png"))])
                assert g.status_code == 200 and g.json()["task"] == "gamma"
                assert admin.delete(f"{base}/admin/tasks/gamma").status_code == 204
            r = admin.post(f"{base}/admin/tasks", files={"artifact": ("a", artifact_bytes(versions[("alpha", 2)]))})
            assert r.status_code == 201
            time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.result()
    assert failures == []
    assert answered["alpha"] > 5 and answered["beta"] > 5
