"""The metrics hold up against the real thing: promtool accepts them, a Prometheus server scrapes them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import free_port, png_bytes, serve_in_thread


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing in CI: `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha")))
    with serve_in_thread(server_settings(backbone_file, store)) as base:
        for seed in range(3):
            httpx.post(f"{base}/tasks/alpha/predict", files=[("images", ("a.png", png_bytes(seed), "image/png"))])
        httpx.post(f"{base}/tasks/nope/predict", files=[("images", ("a.png", png_bytes(), "image/png"))])
        yield base


def test_promtool_accepts_the_exposition(server):
    exposition = httpx.get(f"{server}/metrics").text
    for name in (
        "piggyback_request_latency_seconds",
        "piggyback_queue_wait_seconds",
        "piggyback_mask_apply_seconds",
        "piggyback_forward_seconds",
        "piggyback_batch_size",
        "piggyback_inflight_requests",
        "piggyback_registered_tasks",
        "piggyback_errors_total",
        "piggyback_task_cache_events_total",
    ):
        assert name in exposition
    check = subprocess.run([_binary("promtool"), "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_prometheus_scrapes_latency_series(server, tmp_path):
    port = free_port()
    target = server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: piggyback\n    static_configs:\n      - targets: ['{target}']\n"
    )
    process = subprocess.Popen(
        [
            _binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    query = 'piggyback_request_latency_seconds_count{task="alpha",status="200"}'
    try:
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()
            except httpx.HTTPError:
                continue
            result = body.get("data", {}).get("result", [])
        assert result, "Prometheus never returned the latency series"
        assert float(result[0]["value"][1]) == 3.0
        unknown = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query",
            params={"query": 'piggyback_request_latency_seconds_count{task="nope"}'},
        ).json()
        assert unknown["data"]["result"] == []  # unknown names never become series
    finally:
        process.terminate()
        process.wait(timeout=30)
