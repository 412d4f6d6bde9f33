"""Clients that try to take the server down, against the real `python -m service` process.

Each test is a client the service will meet in the wild: uploads trickled one byte a second, a small
V2 request that asks for a huge answer, a huge JSON tensor for a tiny input, a header with a digit
that is not ASCII, and a SIGTERM while such a client is connected. The service must answer each
with a bounded amount of work, keep serving everyone else, and still drain in bounded time.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mask_store import Preprocess, TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact
from tests.support.servers import png_bytes, rss_mb, start_service, stop_process

# timing-, memory- or machine-sensitive: runs alone (Makefile `test`); every test starts a server process
pytestmark = [pytest.mark.serial, pytest.mark.slow]

PX32 = Preprocess(size=32, grayscale=True, mean=(0.5,) * 3, std=(0.5,) * 3)
BODY_TIMEOUT_S = 4
SUPERSCRIPT_TWO = "\u00b2".encode("latin-1")  # "²": str.isdigit() says yes, int() says no


def multipart_upload(image: bytes) -> bytes:
    """A well-formed `images` upload with the boundary `x`, as the Trickler sends it."""
    part = b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    return part + image + b"\r\n--x--\r\n"


class Trickler:
    """A raw HTTP/1.1 client that announces a well-formed upload and then sends it one byte at a time."""

    def __init__(self, port: int, path: str = "/tasks/alpha/predict", **headers: str):
        self.body = multipart_upload(png_bytes(seed=2, size=32))
        self.sent = 0
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(self.body)}"]
        lines += ["Content-Type: multipart/form-data; boundary=x", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def trickle(self) -> bool:
        """One more byte (never the last); False once the server has closed the connection."""
        try:
            if self.sent < len(self.body) - 1:
                self.sock.send(self.body[self.sent : self.sent + 1])
                self.sent += 1
            return True
        except OSError:
            return False

    def answer_status(self, timeout: float) -> int | None:
        """The status of the server's answer, or None if it closed without one."""
        self.sock.settimeout(timeout)
        try:
            head = self.sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return None
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("store")
    TaskStore(path).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha", preprocess=PX32)))
    return path


@pytest.fixture(scope="module")
def server(store, backbone_file):
    """The defaults a deployment has (a cap of 64 predictions), with a short body bound for the test."""
    process, port = start_service(store, backbone_file, body_timeout_s=str(BODY_TIMEOUT_S))
    try:
        yield process, port
    finally:
        stop_process(process, grace_s=30)


def predict(port: int, timeout: float = 30) -> httpx.Response:
    files = [("images", ("a.png", png_bytes(seed=1, size=32), "image/png"))]
    return httpx.post(f"http://127.0.0.1:{port}/tasks/alpha/predict", files=files, timeout=timeout)


class HealthProbe:
    """Polls /healthz from its own thread for as long as the block runs; `worst_s` is the slowest answer."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.worst_s = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get(self.url).status_code == 200
                self.worst_s = max(self.worst_s, time.monotonic() - started)
                self.answers += 1
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


# a real server process and 100 sockets held open for the body bound: about 15 s
def test_100_trickling_uploads_against_a_cap_of_64_starve_no_normal_client(server):
    process, port = server
    tricklers = [Trickler(port) for _ in range(100)]
    try:
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < BODY_TIMEOUT_S - 1:
            for trickler in tricklers:
                trickler.trickle()
            answers.append(predict(port, timeout=10))
        assert len(answers) >= 3
        assert [r.status_code for r in answers] == [200] * len(answers), [r.text[:200] for r in answers[:3]]
        # past the body bound every trickler is answered 408 and its connection closed
        statuses = [trickler.answer_status(timeout=BODY_TIMEOUT_S + 5) for trickler in tricklers]
        assert statuses == [408] * len(tricklers)
        assert predict(port).status_code == 200
    finally:
        for trickler in tricklers:
            trickler.close()


def test_a_v2_request_naming_one_output_200000_times_is_refused_while_healthz_answers(server):
    process, port = server
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}],
        "outputs": [{"name": "probabilities"}] * 200_000,
    }
    before = rss_mb(process.pid)
    with HealthProbe(port) as probe:
        response = httpx.post(f"http://127.0.0.1:{port}/v2/models/alpha/infer", json=body, timeout=30)
    assert response.status_code in (400, 413), response.text[:300]
    assert "error" in response.json()
    assert probe.answers > 0 and probe.worst_s < 1.0
    assert rss_mb(process.pid) - before < 200  # the review's server grew 1.1 GB for this request
    body["outputs"] = [{"name": "probabilities"}] * 2
    twice = httpx.post(f"http://127.0.0.1:{port}/v2/models/alpha/infer", json=body, timeout=30)
    assert twice.status_code == 400 and "at most once" in twice.json()["error"]
    body["outputs"] = body["outputs"][:1]
    assert httpx.post(f"http://127.0.0.1:{port}/v2/models/alpha/infer", json=body, timeout=30).status_code == 200


def test_a_57_mib_json_tensor_for_a_32_px_input_is_refused_before_it_is_parsed(server):
    process, port = server
    values = ",".join(["0.123456789"] * (57 * 1024 * 1024 // 12))
    body = f'{{"inputs": [{{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [{values}]}}]}}'
    before = rss_mb(process.pid)
    with HealthProbe(port) as probe:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v2/models/alpha/infer",
            content=body.encode(),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    assert response.status_code == 413, response.text[:300]
    assert "JSON values" in response.json()["error"]
    assert probe.answers > 0 and probe.worst_s < 1.0
    assert rss_mb(process.pid) - before < 400  # the body itself, not the 760 MB its parse cost before


def test_a_non_ascii_digit_in_the_binary_header_length_is_a_400(server):
    process, port = server
    response = httpx.post(
        f"http://127.0.0.1:{port}/v2/models/alpha/infer",
        content=b'{"inputs": []}',
        headers={
            "Inference-Header-Content-Length": "\u00b2".encode("latin-1"),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]


# its own server process with a cap of 2: about 10 s
def test_two_slow_uploads_neither_hold_the_only_two_slots_nor_outlive_their_deadline(store, backbone_file):
    process, port = start_service(
        store, backbone_file, max_concurrent_predictions="2", request_timeout_s="3", body_timeout_s="30"
    )
    try:
        slow = [Trickler(port), Trickler(port)]
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 2:
            for trickler in slow:
                trickler.trickle()
            answers.append(predict(port))
        assert answers and all(r.status_code == 200 for r in answers), [r.text[:200] for r in answers[:3]]
        assert [trickler.answer_status(timeout=5) for trickler in slow] == [408, 408]  # at the 3 s deadline
        assert time.monotonic() - started < 3 + 4  # the deadline, with room for a loaded machine
    finally:
        stop_process(process, grace_s=30)


# its own server process: about 10 s
def test_sigterm_with_a_trickling_client_exits_0_within_the_drain_time(store, backbone_file):
    drain_s = 3
    process, port = start_service(store, backbone_file, drain_s=str(drain_s), body_timeout_s="60")
    slow = Trickler(port)
    try:
        slow.trickle()
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(predict, port).result().status_code == 200
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for _ in range(drain_s * 2):
            slow.trickle()
            time.sleep(0.5)
        assert process.wait(timeout=drain_s + 2 + 2) == 0
        assert time.monotonic() - signalled < drain_s + 2
    finally:
        slow.close()
        if process.poll() is None:
            process.kill()
            process.wait()
