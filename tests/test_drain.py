"""SIGTERM under load against the real `python -m service` process: drain, then exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mask_store import Preprocess, TaskStore, artifact_bytes
from tests.conftest import ADMIN_TOKEN, random_task_artifact
from tests.servers import free_port, png_bytes, wait_ready

DRAIN_S = 60
REQUESTS, IMAGES = 6, 16  # one image per forward: about a hundred forwards still to run at SIGTERM


def inflight(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("piggyback_inflight_requests "):
            return float(line.split()[1])
    raise AssertionError("no piggyback_inflight_requests in /metrics")


@pytest.mark.slow  # a real server process: about a minute on 2 shared cores, mostly start-up
def test_sigterm_drains_admitted_requests_refuses_new_ones_and_exits_0(tmp_path, backbone_file, resnet18):
    store = tmp_path / "store"
    preprocess = Preprocess(size=64, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)  # slow enough to drain
    TaskStore(store).put(
        artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", preprocess=preprocess))
    )
    port = free_port()
    env = {
        **os.environ,
        "PIGGYBACK_BACKBONE": "resnet18",
        "PIGGYBACK_WEIGHTS": str(backbone_file),
        "PIGGYBACK_STORE": str(store),
        "PIGGYBACK_ADMIN_TOKEN": ADMIN_TOKEN,
        "PIGGYBACK_PORT": str(port),
        "PIGGYBACK_DEVICE": "cpu",
        "PIGGYBACK_MAX_BATCH_SIZE": "1",
        "PIGGYBACK_MAX_QUEUED_IMAGES": str(REQUESTS * IMAGES),
        "PIGGYBACK_DRAIN_S": str(DRAIN_S),
        "PIGGYBACK_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    base = f"http://127.0.0.1:{port}"
    files = [("images", (f"{i}.png", png_bytes(seed=i, size=64), "image/png")) for i in range(IMAGES)]
    try:
        wait_ready(base, process=server)
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [
                pool.submit(httpx.post, f"{base}/tasks/alpha/predict", files=files, timeout=DRAIN_S)
                for _ in range(REQUESTS)
            ]
            for wait_s, wanted in ((60, 1), (5, REQUESTS)):  # the first admitted, then briefly the rest
                deadline = time.monotonic() + wait_s
                while inflight(base) < wanted and time.monotonic() < deadline:
                    time.sleep(0.01)
            # on a loaded machine one request may already be answered, another still uploading (it will be new)
            admitted = inflight(base)
            answered_before = sum(f.done() for f in futures)
            assert admitted >= 1
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)

            deadline = time.monotonic() + 5
            while (ready := httpx.get(f"{base}/readyz")).status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ready.status_code == 503
            refused = httpx.post(f"{base}/tasks/alpha/predict", files=files[:1], timeout=10)
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert "shutting down" in refused.json()["detail"]
            assert not all(f.done() for f in futures), "the drain must still have had work when refused"

            answers = [f.result() for f in futures]
        # every prediction admitted before SIGTERM completed; any that arrived after it was refused
        assert sum(r.status_code == 200 for r in answers) >= admitted + answered_before
        assert {r.status_code for r in answers} <= {200, 503}
        assert all(len(r.json()["predictions"]) == IMAGES for r in answers if r.status_code == 200)
        assert server.wait(timeout=DRAIN_S) == 0
        assert time.monotonic() - signalled < DRAIN_S
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
