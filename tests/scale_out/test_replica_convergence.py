"""Two `python -m service` processes on one store (directory or S3 bucket) converge: registrations, new versions and
unregistrations made through either are served by both within two seconds, while a stream of
predictions on both never fails and every answer comes from the version it reports."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import ADMIN_TOKEN, random_task_artifact
from tests.support.reference_model import dedicated_network, expected_probabilities
from tests.support.servers import png_bytes, service_process

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGE = png_bytes(seed=11)
CONVERGENCE_S = 2.0


def probabilities(response: httpx.Response) -> list[float]:
    ranked = response.json()["predictions"][0]["top_k"]
    return [entry["score"] for entry in sorted(ranked, key=lambda entry: entry["index"])]


class Stream(threading.Thread):
    """Predicts one task in a loop; records every failure and every answer that its version contradicts."""

    def __init__(self, base: str, task: str, expected: dict[tuple[str, int], list[float]]):
        super().__init__(daemon=True)
        self.base, self.task, self.expected = base, task, expected
        self.stop, self.answers, self.failures = threading.Event(), 0, []

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                files = [("images", ("x.png", IMAGE, "image/png"))]
                response = client.post(f"{self.base}/tasks/{self.task}/predict", files=files)
                if response.status_code != 200:
                    self.failures.append(f"{self.base} {self.task}: {response.status_code} {response.text}")
                    continue
                version = response.json()["version"]
                if not torch.allclose(
                    torch.tensor(probabilities(response)), torch.tensor(self.expected[(self.task, version)]), atol=1e-5
                ):
                    self.failures.append(f"{self.base} {self.task}: answer does not match version {version}")
                self.answers += 1

    def finish(self) -> tuple[int, list[str]]:
        self.stop.set()
        self.join(timeout=60)
        return self.answers, self.failures


def wait_until(condition, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < CONVERGENCE_S, f"not converged within {CONVERGENCE_S} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def register(base: str, artifact) -> None:
    files = {"artifact": ("t.safetensors", artifact_bytes(artifact))}
    upload = httpx.post(f"{base}/admin/tasks", files=files, headers=AUTH, timeout=60)
    assert upload.status_code == 201, upload.text


def version_served(base: str, task: str) -> int | None:
    response = httpx.get(f"{base}/tasks/{task}", timeout=10)
    return response.json()["version"] if response.status_code == 200 else None


@pytest.mark.slow
def test_two_processes_on_one_store_converge_without_failing_a_request(store_location, backbone_file, resnet18):
    """On a shared directory, and on one bucket of a real S3-compatible server."""
    store = store_location[1]
    stable = random_task_artifact(resnet18, "resnet18", task="s", seed=1)
    t1 = random_task_artifact(resnet18, "resnet18", task="t", version=1, seed=2)
    t2 = random_task_artifact(resnet18, "resnet18", task="t", version=2, seed=3)
    TaskStore(store).put(artifact_bytes(stable))
    image = Image.open(io.BytesIO(IMAGE))
    expected = {
        (a.manifest.task, a.manifest.version): expected_probabilities(dedicated_network(resnet18, a), a, [image])[
            0
        ].tolist()
        for a in (stable, t1, t2)
    }
    env = {
        "PIGGYBACK_BACKBONE": "resnet18",
        "PIGGYBACK_WEIGHTS": str(backbone_file),
        "PIGGYBACK_STORE": str(store),
        "PIGGYBACK_ADMIN_TOKEN": ADMIN_TOKEN,
        "PIGGYBACK_STORE_POLL_S": "0.5",
        "PIGGYBACK_MAX_BATCH_DELAY_MS": "2",
    }
    with service_process(env) as a, service_process(env) as b:
        stable_streams = [Stream(base, "s", expected) for base in (a, b)]
        for stream in stable_streams:
            stream.start()

        register(a, t1)
        wait_until(lambda: version_served(b, "t") == 1, "registration on A served by B")
        task_streams = [Stream(base, "t", expected) for base in (a, b)]
        for stream in task_streams:
            stream.start()

        register(b, t2)
        wait_until(lambda: version_served(a, "t") == 2, "new version on B served by A")
        time.sleep(0.5)  # both streams answer from version 2 for a while
        for stream in task_streams:
            answers, failures = stream.finish()
            assert failures == [] and answers > 0

        assert httpx.delete(f"{a}/admin/tasks/t", headers=AUTH, timeout=60).status_code == 204
        wait_until(lambda: version_served(b, "t") is None, "unregistration on A reaches B")
        assert httpx.post(f"{b}/tasks/t/predict", files=[("images", ("x.png", IMAGE))], timeout=30).status_code == 404

        for stream in stable_streams:
            answers, failures = stream.finish()
            assert failures == [] and answers > 0
