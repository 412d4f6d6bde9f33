"""The service on a real two-node Ray cluster (loopback, token auth), deployed with the shipped Serve config.

One cluster for the module: `ray start --head` + `ray start --address` (one CPU each, so the two
replicas land one per node), `serve deploy` of docker/ray-serve.yaml with this test's settings, and
`ray stop` at the end whatever happens. Tests run in file order: the kill test and the shutdown come last.
The router's refusals are checked with raw sockets, so a test sees the answer arrive while the body
has not been (fully) sent.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import socket
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
from tests.support.builders import ADMIN_TOKEN, random_task_artifact, server_settings
from tests.support.servers import free_port, metric, png_bytes, serve_in_thread

# ray is looked up, not imported: collecting this file costs every test worker nothing
NO_RAY = importlib.util.find_spec("ray") is None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,
    pytest.mark.skipif(NO_RAY, reason="ray is the optional extra: pip install -e '.[ray]'"),
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REPLICA = "x-piggyback-replica"
ROUTER_MAX_INFLIGHT = 8
MAX_REQUEST_BYTES = 1024 * 1024
RESIDENT_BUDGET_MB = 2  # one resnet18 task (about 1.41 MiB) per replica: loads and evictions are frequent


def _run(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _predict(base: str, task: str, seed: int, client: httpx.Client | None = None) -> httpx.Response:
    post = (client or httpx).post
    return post(f"{base}/tasks/{task}/predict", files=[("images", ("x.png", png_bytes(seed), "image/png"))], timeout=60)


def _replicas_seen(base: str, want: int, timeout: float = 180, listing: str | None = None) -> dict[str, dict]:
    """Poll GET /tasks (not task-routed: any replica) until `want` distinct replicas have answered (and
    list the task `listing`, if given)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout

    def enough() -> bool:
        return len(seen) >= want and (listing is None or all(listing in names for names in seen.values()))

    while time.monotonic() < deadline and not enough():
        try:
            response = httpx.get(f"{base}/tasks", timeout=10)
            if response.status_code == 200:
                seen[response.headers[REPLICA]] = {t["name"] for t in response.json()}
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert enough(), f"only {sorted(seen)} answered (listing {listing}) within {timeout}s"
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory, resnet18):
    root = tmp_path_factory.mktemp("ray-store")
    for seed, task in enumerate(("alpha", "gamma")):
        TaskStore(root).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task=task, seed=seed)))
    return root


@pytest.fixture(scope="module")
def ray_env() -> dict:
    """The environment and ports of the module's cluster: what a driver needs to join it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return {"env": env, "gcs": free_port(), "dashboard": free_port(), "proxy": free_port()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, store, backbone_file, ray_env):
    """Two Ray nodes on 127.0.0.1 with token auth, the Serve app deployed with 2 replicas; yields the proxy URL."""
    env, gcs, dashboard, proxy = ray_env["env"], ray_env["gcs"], ray_env["dashboard"], ray_env["proxy"]
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
        PIGGYBACK_RAY_ROUTER_MAX_INFLIGHT=str(ROUTER_MAX_INFLIGHT),  # small, so a test can hold them all
        PIGGYBACK_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),  # small, so a chunked body crosses it quickly
        PIGGYBACK_RESIDENT_BUDGET_MB=str(RESIDENT_BUDGET_MB),
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


def _register(base: str, resnet18, task: str, seed: int) -> None:
    """Register a random-mask task through the proxy (any replica answers; the store carries it to all)."""
    artifact = artifact_bytes(random_task_artifact(resnet18, "resnet18", task=task, seed=seed))
    created = httpx.post(
        f"{base}/admin/tasks",
        files={"artifact": (f"{task}.safetensors", artifact)},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    assert created.status_code == 201, created.text


def _v2_infer(base: str, task: str, seed: int) -> httpx.Response:
    image = base64.b64encode(png_bytes(seed)).decode()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}
    return httpx.post(f"{base}/v2/models/{task}/infer", json=body, timeout=60)


def test_task_routing_keeps_one_task_on_the_replica_that_holds_it(cluster, resnet18):
    """A task no request has touched yet: its first request picks a replica, which then holds it; once
    Serve's router has heard so (the replica reports its held tasks asynchronously: a request arriving
    before the news may pick the other replica, which then holds it too), every request, through either
    front door, goes to that replica."""
    _register(cluster, resnet18, "epsilon", seed=11)
    assert all("epsilon" in names for names in _replicas_seen(cluster, 2, listing="epsilon").values())
    holder = _predict(cluster, "epsilon", 0).headers[REPLICA]
    time.sleep(3)  # the router hears which replica holds epsilon
    replicas = {_predict(cluster, "epsilon", seed).headers[REPLICA] for seed in range(10)}
    assert replicas == {holder}  # sequential requests never spread to a replica that does not hold it
    v2 = [_v2_infer(cluster, "epsilon", seed) for seed in range(10)]  # the KServe V2 front door is routed alike
    assert [r.status_code for r in v2] == [200] * 10, v2[0].text
    assert {r.headers[REPLICA] for r in v2} == {holder}


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
    _register(cluster, resnet18, "delta", seed=7)
    listed: dict[str, set] = {}
    deadline = time.monotonic() + 30  # convergence bound: PIGGYBACK_STORE_POLL_S (1 s) plus scheduling slack
    while time.monotonic() < deadline and not (len(listed) == 2 and all("delta" in t for t in listed.values())):
        response = httpx.get(f"{cluster}/tasks", timeout=30)
        listed[response.headers[REPLICA]] = {t["name"] for t in response.json()}
        time.sleep(0.1)
    assert len(listed) == 2 and all("delta" in names for names in listed.values()), listed
    assert _predict(cluster, "delta", 0).json()["task"] == "delta"


def test_serve_routes_to_a_replica_exactly_the_tasks_resident_there(cluster):
    """Serve's multiplexed set has no count of its own: with room for one task per replica, requests for
    four tasks make the replicas evict, and every replica's routed tasks stay equal to its resident ones."""
    for _ in range(3):
        for task in ("alpha", "gamma", "delta", "epsilon"):
            assert _predict(cluster, task, 0).status_code == 200
    replicas = [f"http://{t['targets'][0]}" for t in httpx.get(f"{cluster}/metrics/targets", timeout=30).json()]
    assert len(replicas) == 2
    evictions = 0.0
    for replica in replicas:
        resident = metric(replica, "piggyback_resident_tasks")
        assert metric(replica, "piggyback_ray_routed_tasks") == resident <= 1
        evictions += metric(replica, "piggyback_resident_evictions_total")
    assert evictions >= 2  # four tasks on two replicas holding one each: the sets did shrink


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


def _open(base: str, method: str, path: str, headers: dict, body: bytes = b"") -> socket.socket:
    """A raw HTTP/1.1 request whose body may be left unfinished: the headers and the first `body` bytes."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read one response (status, lower-cased headers, JSON body) from `sock`, then close it."""
    data = b""
    with sock:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the response body"
            body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def _multipart(seed: int) -> tuple[bytes, str]:
    """A one-image predict body and its content type, to send by hand."""
    request = httpx.Request("POST", "http://x/", files=[("images", ("x.png", png_bytes(seed), "image/png"))])
    return request.read(), request.headers["content-type"]


def test_admin_uploads_are_refused_from_the_headers_before_the_body(cluster):
    huge = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(256 * 1024 * 1024)}
    started = time.monotonic()
    status, headers, body = _answer(_open(cluster, "POST", "/admin/tasks", huge, b"x" * 65536))
    assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in body["detail"]
    assert headers["connection"] == "close" and time.monotonic() - started < 10  # 64 KiB of 256 MiB were sent
    wrong = {**huge, "Authorization": "Bearer not-the-token"}
    assert _answer(_open(cluster, "POST", "/admin/tasks", wrong, b"x" * 65536))[0] == 403
    # with the token, an artifact over PIGGYBACK_MAX_ARTIFACT_BYTES (+1 MiB of form framing) is 413 from its header
    too_big = {**huge, "Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Length": str(2 * 1024**3)}
    status, _, body = _answer(_open(cluster, "POST", "/admin/tasks", too_big))
    assert status == 413 and "larger than" in body["detail"]


def test_prediction_bodies_over_the_limit_are_413_declared_or_chunked(cluster):
    declared = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(MAX_REQUEST_BYTES + 1)}
    status, headers, body = _answer(_open(cluster, "POST", "/tasks/alpha/predict", declared))
    assert status == 413 and headers["connection"] == "close" and "larger than" in body["detail"]
    v2 = {**declared, "Content-Type": "application/json"}
    status, _, body = _answer(_open(cluster, "POST", "/v2/models/alpha/infer", v2))
    assert status == 413 and "larger than" in body["error"]  # the Open Inference Protocol's error key
    # chunked: no length to check up front; counted while read, answered once past the limit (1.25x sent)
    chunked = {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked"}
    piece = b"x" * 65536
    sock = _open(cluster, "POST", "/tasks/alpha/predict", chunked)
    for _ in range(MAX_REQUEST_BYTES * 5 // 4 // len(piece)):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, _, body = _answer(sock)  # never the terminating chunk: a router that waits for it times out here
    assert status == 413 and "larger than" in body["detail"]


def test_the_router_caps_its_requests_in_flight_from_the_headers(cluster):
    body, content_type = _multipart(0)
    slow = {"Content-Type": content_type, "Content-Length": str(len(body))}
    held: list[socket.socket] = []
    refused: list[tuple[int, dict[str, str], dict]] = []  # held requests answered with their body unsent
    try:
        deadline, response = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            # keep ROUTER_MAX_INFLIGHT uploads open in the router; one refused (while a request of an earlier
            # test was still counted) is answered at once, from its headers: replace it
            for sock in [sock for sock in held if select.select([sock], [], [], 0)[0]]:
                held.remove(sock)
                refused.append(_answer(sock))
            held += [
                _open(cluster, "POST", "/tasks/alpha/predict", slow, body[:10])
                for _ in range(ROUTER_MAX_INFLIGHT - len(held))
            ]
            time.sleep(0.2)  # the held requests reach the router a moment after their headers
            response = _predict(cluster, "alpha", 1)
            if response.status_code == 503:
                break
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] and "router overloaded" in response.json()["detail"]
        assert REPLICA not in response.headers  # answered by the router itself, no replica involved
        assert all(status == 503 and headers["retry-after"] for status, headers, _ in refused), refused
    finally:
        for sock in held:
            sock.close()
    deadline, statuses = time.monotonic() + 20, []
    while time.monotonic() < deadline and statuses[-1:] != [200]:  # the abandoned requests release their places
        statuses.append(_predict(cluster, "alpha", 2).status_code)
        time.sleep(0.2)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses


def test_time_spent_before_a_replica_counts_against_the_deadline(cluster):
    body, content_type = _multipart(3)

    def slow_upload(timeout_s: str) -> tuple[int, dict]:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "X-Request-Timeout": timeout_s}
        sock = _open(cluster, "POST", "/tasks/alpha/predict", headers, body[:100])
        time.sleep(1.0)  # a slow client: the deadline runs from the request's arrival at the router
        sock.sendall(body[100:])
        status, _, answer = _answer(sock)
        return status, answer

    assert slow_upload("30")[0] == 200
    status, answer = slow_upload("0.5")
    assert status == 504 and "deadline passed" in answer["detail"], answer


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


def _driver(ray_env: dict, code: str) -> str:
    """Run `code` in a Ray driver joined to the module's cluster (a subprocess: this one never imports ray)."""
    prelude = (
        "import json, ray\n"
        f"ray.init(address='127.0.0.1:{ray_env['gcs']}', namespace='piggyback', logging_level='ERROR')\n"
        "targets = ray.get_actor('piggyback-metrics-targets')\n"
    )
    return _run([sys.executable, "-c", prelude + code], ray_env["env"]).stdout


def test_metrics_targets_drop_lost_replicas_and_stopped_ones_leave(cluster, ray_env):
    listed = httpx.get(f"{cluster}/metrics/targets", timeout=30).json()  # after the kill: prunes the lost replica
    assert len(listed) == 2, listed
    # the targets actor itself holds no more than the live replicas, and a graceful stop removes each one
    out = _driver(
        ray_env,
        "from ray import serve\n"
        "import time\n"
        "print(json.dumps(ray.get(targets.all.remote())))\n"
        "serve.shutdown()\n"
        "deadline = time.monotonic() + 60\n"
        "while ray.get(targets.all.remote()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.2)\n"
        "print(json.dumps(ray.get(targets.all.remote())))\n",
    )
    before, after = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert sorted(before.values()) == sorted(t["targets"][0] for t in listed), (before, listed)
    assert after == {}, after
