"""The service on a real two-node Ray cluster (loopback, token auth), deployed with the shipped Serve config.

One cluster for the module: `ray start --head` + `ray start --address` (one CPU each, so the two
replicas land one per node), `serve deploy` of docker/ray-serve.yaml with this test's settings, and
`ray stop` at the end whatever happens. Tests run in file order: the kill test comes last.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from mask_store import TaskStore, artifact_bytes
from tests.conftest import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.servers import free_port, png_bytes, serve_in_thread

pytest.importorskip("ray.serve", reason="ray is the optional extra: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REPLICA = "x-piggyback-replica"


def _run(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _predict(base: str, task: str, seed: int, client: httpx.Client | None = None) -> httpx.Response:
    post = (client or httpx).post
    return post(f"{base}/tasks/{task}/predict", files=[("images", ("x.png", png_bytes(seed), "image/png"))], timeout=60)


def _replicas_seen(base: str, want: int, timeout: float = 180) -> dict[str, dict]:
    """Poll GET /tasks (not task-routed: any replica) until `want` distinct replicas have answered."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < want:
        try:
            response = httpx.get(f"{base}/tasks", timeout=10)
            if response.status_code == 200:
                seen[response.headers[REPLICA]] = {t["name"] for t in response.json()}
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert len(seen) >= want, f"only {sorted(seen)} answered within {timeout}s"
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory, resnet18):
    root = tmp_path_factory.mktemp("ray-store")
    for seed, task in enumerate(("alpha", "gamma")):
        TaskStore(root).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=task, seed=seed)))
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, store, backbone_file):
    """Two Ray nodes on 127.0.0.1 with token auth, the Serve app deployed with 2 replicas; yields the proxy URL."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs, dashboard, proxy = free_port(), free_port(), free_port()
    config = yaml.safe_load((ROOT / "docker" / "ray-serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": proxy}
    application = config["applications"][0]
    application["runtime_env"]["env_vars"].update(
        PIGGYBACK_WEIGHTS=str(backbone_file),
        PIGGYBACK_STORE=str(store),
        PIGGYBACK_DEVICE="cpu",
        PIGGYBACK_ADMIN_TOKEN=ADMIN_TOKEN,
        PIGGYBACK_MAX_BATCH_DELAY_MS="2",
        PIGGYBACK_RAY_MAX_ONGOING_REQUESTS="2",  # small bounds, so the overload test can fill them
        PIGGYBACK_RAY_MAX_QUEUED_REQUESTS="2",
    )
    for deployment in application["deployments"]:
        if deployment["name"] == "PiggybackReplica":
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 2
    config_file = tmp_path_factory.mktemp("ray") / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    node = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        _run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
              "--dashboard-host=127.0.0.1", *node], env)  # fmt: skip
        _run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={free_port()}",
              f"--metrics-export-port={free_port()}", *node], env)  # fmt: skip
        _run([str(BIN / "serve"), "deploy", str(config_file), f"--address=http://127.0.0.1:{dashboard}"], env)
        base = f"http://127.0.0.1:{proxy}"
        try:
            _replicas_seen(base, 2)
        except AssertionError:
            status = subprocess.run([str(BIN / "serve"), "status", f"--address=http://127.0.0.1:{dashboard}"],
                                    env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
            raise AssertionError(f"the Serve app never came up:\n{status.stdout}\n{status.stderr}") from None
        yield base
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_predictions_through_the_proxy_equal_the_single_process_service(cluster, store, backbone_file):
    through_ray = [_predict(cluster, "alpha", seed) for seed in range(4)]
    assert all(r.status_code == 200 for r in through_ray), [r.text for r in through_ray]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray replica: the same reduction order, so bit-equal scores
    try:
        with serve_in_thread(server_settings(backbone_file, store)) as single:
            reference = [_predict(single, "alpha", seed) for seed in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert [r.json() for r in through_ray] == [r.json() for r in reference]
    assert all(r.headers[REPLICA] for r in through_ray)


def _v2_infer(base: str, task: str, seed: int) -> httpx.Response:
    image = base64.b64encode(png_bytes(seed)).decode()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}
    return httpx.post(f"{base}/v2/models/{task}/infer", json=body, timeout=60)


def test_task_routing_keeps_one_task_on_the_replica_that_holds_it(cluster):
    replicas = {_predict(cluster, "alpha", seed).headers[REPLICA] for seed in range(10)}
    assert len(replicas) == 1, replicas  # sequential requests never overload the replica holding alpha
    v2 = [_v2_infer(cluster, "alpha", seed) for seed in range(10)]  # the KServe V2 front door is routed alike
    assert [r.status_code for r in v2] == [200] * 10, v2[0].text
    assert {r.headers[REPLICA] for r in v2} == replicas


def test_errors_keep_the_contract_through_the_proxy(cluster):
    missing = _predict(cluster, "nope", 0)
    assert missing.status_code == 404 and "detail" in missing.json() and missing.headers[REPLICA]
    not_image = httpx.post(
        f"{cluster}/tasks/alpha/predict", files=[("images", ("x.png", b"not an image", "image/png"))], timeout=60
    )
    assert not_image.status_code == 415 and "detail" in not_image.json()


def _prometheus(tmp_path: Path, targets_url: str):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus missing in CI: `make test` installs Debian's prometheus package")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: piggyback\n    http_sd_configs:\n"
        f"      - url: {targets_url}\n        refresh_interval: 1s\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def test_prometheus_sums_the_request_counter_over_both_replicas(cluster, tmp_path):
    targets = httpx.get(f"{cluster}/metrics/targets", timeout=30).json()
    assert len({t["labels"]["replica"] for t in targets}) == 2, targets
    sent = 12
    # 2 at a time: within one replica's max_ongoing_requests, since task routing sends them all to one replica
    with httpx.Client() as client, _threads(2) as pool:
        responses = list(pool.map(lambda seed: _predict(cluster, "gamma", seed, client), range(sent)))
    assert [r.status_code for r in responses] == [200] * sent, [r.text for r in responses if r.status_code != 200]
    process, prometheus = _prometheus(tmp_path, f"{cluster}/metrics/targets")
    query = 'sum(piggyback_request_latency_seconds_count{task="gamma",status="200"})'
    try:
        deadline, value, up = time.monotonic() + 90, None, 0
        while time.monotonic() < deadline and (value != sent or up < 2):
            time.sleep(1)
            try:
                result = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}).json()["data"]["result"]
                ups = httpx.get(f"{prometheus}/api/v1/query", params={"query": "sum(up)"}).json()["data"]["result"]
            except (httpx.HTTPError, KeyError):
                continue
            value = float(result[0]["value"][1]) if result else None
            up = float(ups[0]["value"][1]) if ups else 0
        assert up == 2, "Prometheus did not scrape both replicas"
        assert value == sent
    finally:
        process.terminate()
        process.wait(timeout=30)


class _threads:
    """A small thread pool as a context manager, for concurrent clients."""

    def __init__(self, n: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(n)

    def __enter__(self):
        return self.pool

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)


def test_a_registration_through_the_proxy_reaches_both_replicas(cluster, resnet18):
    artifact = artifact_bytes(random_task_artifact(resnet18, "resnet18", task="delta", seed=7))
    created = httpx.post(
        f"{cluster}/admin/tasks",
        files={"artifact": ("delta.safetensors", artifact)},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    assert created.status_code == 201, created.text
    listed: dict[str, set] = {}
    deadline = time.monotonic() + 30  # convergence bound: PIGGYBACK_STORE_POLL_S (1 s) plus scheduling slack
    while time.monotonic() < deadline and not (len(listed) == 2 and all("delta" in t for t in listed.values())):
        response = httpx.get(f"{cluster}/tasks", timeout=30)
        listed[response.headers[REPLICA]] = {t["name"] for t in response.json()}
        time.sleep(0.1)
    assert len(listed) == 2 and all("delta" in names for names in listed.values()), listed
    assert _predict(cluster, "delta", 0).json()["task"] == "delta"


def test_overload_answers_503_with_retry_after_not_an_unbounded_queue(cluster):
    many = [("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(16)]
    barrier = threading.Barrier(32)

    def burst(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            return client.post(f"{cluster}/tasks/alpha/predict", files=many)

    with _threads(32) as pool:
        responses = list(pool.map(burst, range(32)))  # 32 at once vs 2 replicas x 2 ongoing + 2 queued
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] and "detail" in response.json()


def test_kill_9_one_replica_under_a_stream(cluster):
    victim = _predict(cluster, "alpha", 0).headers[REPLICA]  # the replica holding alpha: the stream goes there
    pid = int(victim.rsplit("-", 1)[1])  # the header is hostname-pid

    stop, plain, retried = threading.Event(), [], []

    def plain_stream() -> None:  # no retries: every request must end with a status, never hang
        with httpx.Client(timeout=60) as client:
            seed = 0
            while not stop.is_set():
                try:
                    plain.append(_predict(cluster, "alpha", seed, client).status_code)
                except httpx.HTTPError as exc:
                    plain.append(type(exc).__name__)
                seed += 1

    def retrying_stream() -> None:  # the load script's client: retries 503/connection errors with back-off
        with httpx.Client(timeout=60) as client:
            for seed in range(40):
                for attempt in range(20):
                    try:
                        response = _predict(cluster, "alpha", seed, client)
                        if response.status_code != 503:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(min(0.1 * 2**attempt, 2))
                retried.append(response.status_code)

    streams = [threading.Thread(target=plain_stream), threading.Thread(target=retrying_stream)]
    for thread in streams:
        thread.start()
    time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    streams[1].join(timeout=300)
    after = _replicas_seen(cluster, 2, timeout=180)
    stop.set()
    streams[0].join(timeout=120)
    assert not any(t.is_alive() for t in streams), "a request hung"
    assert victim not in after and len(after) == 2  # Ray replaced the dead replica
    assert retried == [200] * 40
    assert set(plain) <= {200, 503}, plain  # requests caught on the dead replica end in 503 + Retry-After
    later = [_predict(cluster, "alpha", seed).status_code for seed in range(5)]
    assert later == [200] * 5
