"""Admission control and deadlines through the real server, with the inference thread held shut.

A gate (a `threading.Event` submitted to the batcher's one-thread executor) blocks every forward
until the test opens it, so what is queued, refused, expired or abandoned is decided by the test,
not by timing. The counters in /metrics must then prove that refused, expired and abandoned work
never reached a forward.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from mask_store import TaskStore, artifact_bytes
from service.app import create_app
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import free_port, metric, png_bytes, wait_ready, wait_until

BOUND = 3  # images allowed to wait; with max_batch_size=1, two more sit in the executor behind the gate


@contextlib.contextmanager
def serve_app(settings):
    """The real app under uvicorn in a thread; yields (app, base URL) so the test can reach the batcher."""
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield app, base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def engine_held(app):
    """Every forward waits until the block exits (the gate opens even if the test fails)."""
    gate = threading.Event()
    app.state.batcher.executor.submit(gate.wait)
    try:
        yield
    finally:
        gate.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone_file, resnet18):
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", seed=1)))
    settings = server_settings(backbone_file, store, max_batch_size=1, max_queued_images=BOUND, request_timeout_s=30)
    with serve_app(settings) as served:
        yield served


def predict(base: str, timeout: float = 60, **headers) -> httpx.Response:
    files = [("images", ("a.png", png_bytes(seed=3), "image/png"))]
    return httpx.post(f"{base}/tasks/alpha/predict", files=files, headers=headers, timeout=timeout)


def counters(base: str) -> dict[str, float]:
    return {
        "forwarded": metric(base, "piggyback_forwarded_images_total"),
        "expired": metric(base, "piggyback_dropped_images_total", reason="expired"),
        "abandoned": metric(base, "piggyback_dropped_images_total", reason="abandoned"),
        "rejected": metric(base, "piggyback_rejected_requests_total", reason="overloaded"),
    }


def fill_executor(app, base, pool) -> list:
    """Two requests taken into batches behind the gate: what follows stays in the queue."""
    fillers = [pool.submit(predict, base) for _ in range(2)]
    wait_until(lambda: app.state.batcher._running == 2)
    return fillers


def test_full_queue_answers_503_at_once_and_accepted_requests_all_succeed(server):
    app, base = server
    before = counters(base)
    sent = 10
    with ThreadPoolExecutor(sent) as pool:
        with engine_held(app):
            futures = [pool.submit(predict, base) for _ in range(sent)]
            # while nothing can finish, every request ends up refused, queued, or in a batch behind the gate
            batcher = app.state.batcher
            wait_until(lambda: sum(f.done() for f in futures) + batcher._queued + batcher._running == sent)
            refused = [f.result() for f in futures if f.done()]
            assert refused, "with the engine held, a burst beyond the bound must be refused"
            for response in refused:
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "1"
                assert "overloaded" in response.json()["detail"]
            admitted = sent - len(refused)
            assert BOUND <= admitted <= BOUND + 2  # the bound, plus at most the two batches behind the gate
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers].count(200) == admitted
    assert {r.status_code for r in answers} == {200, 503}
    after = counters(base)
    assert after["forwarded"] - before["forwarded"] == admitted  # refused images never reached a forward
    assert after["rejected"] - before["rejected"] == len(refused)
    assert metric(base, "piggyback_engine_busy_seconds_total") > 0


def test_expired_requests_get_504_and_never_reach_the_forward(server):
    app, base = server
    before = counters(base)
    with ThreadPoolExecutor(4) as pool:
        with engine_held(app):
            fillers = fill_executor(app, base, pool)
            started = time.monotonic()
            late = [pool.submit(predict, base, **{"X-Request-Timeout": "0.3"}) for _ in range(2)]
            for future in late:
                response = future.result(timeout=20)  # answered while the engine is still held
                assert response.status_code == 504
                assert "deadline" in response.json()["detail"]
            assert time.monotonic() - started < 10  # the header shortened the 30 s server deadline
        assert [f.result().status_code for f in fillers] == [200, 200]
    after = counters(base)
    assert after["expired"] - before["expired"] == 2
    assert after["forwarded"] - before["forwarded"] == 2  # only the fillers


def test_client_that_disconnects_has_its_queued_images_dropped(server):
    app, base = server
    before = counters(base)
    with ThreadPoolExecutor(4) as pool:
        with engine_held(app):
            fillers = fill_executor(app, base, pool)
            with pytest.raises(httpx.ReadTimeout):
                predict(base, timeout=1.0)  # gives up and closes its connection while queued
            wait_until(lambda: metric(base, "piggyback_dropped_images_total", reason="abandoned") > before["abandoned"])
        assert [f.result().status_code for f in fillers] == [200, 200]
    after = counters(base)
    assert after["abandoned"] - before["abandoned"] == 1
    assert after["forwarded"] - before["forwarded"] == 2


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", "inf"])
def test_bad_request_timeout_header_is_a_clear_422(server, value):
    _, base = server
    response = predict(base, **{"X-Request-Timeout": value})
    assert response.status_code == 422
    assert "x-request-timeout" in response.json()["detail"].lower()


def test_long_request_timeout_is_capped_not_refused(server):
    _, base = server
    assert predict(base, **{"X-Request-Timeout": "3600"}).status_code == 200


def test_burst_without_a_gate_is_answered_503_200_or_504(server):
    """A real burst far beyond the bound: refused, answered, or timed out; never a 500 or a dropped connection."""
    _, base = server
    timeout_s, sent = 3.0, 40

    def one() -> tuple[int, str]:
        response = predict(base, **{"X-Request-Timeout": str(timeout_s)})
        return response.status_code, response.headers.get("Retry-After", "")

    with ThreadPoolExecutor(sent) as pool:
        results = list(pool.map(lambda _: one(), range(sent)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503, 504}, statuses
    assert 503 in statuses and 200 in statuses
    assert all(retry == "1" for status, retry in results if status == 503)


def test_predictions_beyond_the_concurrency_cap_are_shed_before_their_body_is_read(tmp_path, backbone_file, resnet18):
    TaskStore(tmp_path).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", seed=1)))
    settings = server_settings(backbone_file, tmp_path, max_batch_size=1, max_concurrent_predictions=2)
    with serve_app(settings) as (app, base), ThreadPoolExecutor(2) as pool:
        with engine_held(app):
            admitted = [pool.submit(predict, base) for _ in range(2)]
            wait_until(lambda: metric(base, "piggyback_inflight_requests") == 2)
            shed = predict(base, timeout=10)
            assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
            assert "in flight" in shed.json()["detail"]  # the client read its 503: no reset mid-upload
            v2 = httpx.post(f"{base}/v2/models/alpha/infer", json={"inputs": []}, timeout=10)
            assert v2.status_code == 503 and "in flight" in v2.json()["error"]
            assert httpx.get(f"{base}/tasks/alpha", timeout=10).status_code == 200  # other routes are not capped
        assert [future.result().status_code for future in admitted] == [200, 200]
        assert metric(base, "piggyback_rejected_requests_total", reason="concurrency") == 2
        assert predict(base).status_code == 200
