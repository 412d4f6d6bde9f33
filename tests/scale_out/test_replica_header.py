"""`X-Piggyback-Replica` names the answering process on every response of the single-process server."""

from __future__ import annotations

import os
import socket

import httpx

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.servers import png_bytes, serve_in_thread


def test_every_response_names_the_replica(tmp_path, backbone_file, resnet18):
    TaskStore(tmp_path).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha")))
    with serve_in_thread(server_settings(backbone_file, tmp_path)) as base:
        image = [("images", ("a.png", png_bytes(), "image/png"))]
        responses = [
            httpx.post(f"{base}/tasks/alpha/predict", files=image),
            httpx.post(f"{base}/tasks/nope/predict", files=image),  # 404
            httpx.post(f"{base}/admin/tasks", files={"artifact": ("a", b"junk")}),  # 401, no token
            httpx.post(
                f"{base}/admin/tasks",
                files={"artifact": ("a", b"junk")},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ),  # 422  # fmt: skip
            httpx.get(f"{base}/metrics"),
            httpx.get(f"{base}/readyz"),
        ]
    assert [r.status_code for r in responses] == [200, 404, 401, 422, 200, 200]
    assert {r.headers["X-Piggyback-Replica"] for r in responses} == {f"{socket.gethostname()}-{os.getpid()}"}


def test_the_replica_id_setting_overrides_the_default(tmp_path, backbone_file):
    with serve_in_thread(server_settings(backbone_file, tmp_path, replica_id="gpu-node-3")) as base:
        assert httpx.get(f"{base}/healthz").headers["X-Piggyback-Replica"] == "gpu-node-3"
