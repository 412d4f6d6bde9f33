"""SIGTERM under load against the real `python -m service` process: drain, then exit 0."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mask_store import Preprocess, TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact
from tests.support.servers import png_bytes, start_service

pytestmark = pytest.mark.serial  # timing-, memory- or machine-sensitive: runs alone (Makefile `test`)

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
    server, port = start_service(
        store, backbone_file, max_batch_size="1", max_queued_images=str(REQUESTS * IMAGES), drain_s=str(DRAIN_S)
    )
    base = f"http://127.0.0.1:{port}"
    files = [("images", (f"{i}.png", png_bytes(seed=i, size=64), "image/png")) for i in range(IMAGES)]
    try:
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
