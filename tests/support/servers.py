"""Helpers to run the real server (in process, in a thread or in its own process) and to make image uploads."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.support.forked import SERVICE, ForkedProcess
from tests.support.http_guard import SERVICE_URLS


def free_port() -> int:
    """A port free now, between Ray's worker ports (10002-19999) and the kernel's ephemeral range. A
    port the kernel hands out (a bind to port 0) can go to another socket's outgoing connection before
    the server binds it: a Ray cluster's start once took the port picked for its Serve proxy."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral_low = int(ports.read().split()[0])
    for _ in range(200):
        port = random.SystemRandom().randrange(20_000, ephemeral_low)  # never a test's seeded sequence
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 20000 and {ephemeral_low}")


def wait_ready(base_url: str, timeout: float = 120.0, process=None) -> None:
    """Wait for /readyz; from then on the suite's HTTP contract guard checks every answer of `base_url`."""
    SERVICE_URLS.add(base_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.output() if isinstance(process, ForkedProcess) else ""
            raise RuntimeError(f"server exited with {process.returncode}\n{output}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout}s")


@contextlib.contextmanager
def serve_in_process(settings: Settings, app: FastAPI | None = None, timeout: float = 120.0):
    """The app with its lifespan, in this process and without a socket; yields a `TestClient` (an
    `httpx.Client` on http://testserver) once /readyz answers 200, checked by the HTTP contract guard.

    For routes and protocol contracts. What needs a real connection (slow or cut bodies, disconnects,
    signals, another process) uses `serve_in_thread` or a process.
    """
    from fastapi.testclient import TestClient

    with TestClient(app or create_app(settings)) as client:
        base = str(client.base_url).rstrip("/")
        SERVICE_URLS.add(base)
        try:
            deadline = time.monotonic() + timeout
            while client.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app was not ready after {timeout}s")
                time.sleep(0.05)
            yield client
        finally:
            SERVICE_URLS.discard(base)


@contextlib.contextmanager
def serve_in_thread(settings: Settings, app: FastAPI | None = None):
    """A real uvicorn server on a free loopback port, in this process; yields its base URL.

    Pass `app` (built by `create_app(settings)`) to reach its state from the test, e.g. to inject a fault.
    """
    port = free_port()
    config = uvicorn.Config(app or create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        SERVICE_URLS.discard(base)


def png_bytes(seed: int = 0, size: int = 16, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@contextlib.contextmanager
def service_process(env: dict[str, str], timeout: float = 120.0):
    """`python -m service`'s main in a real process (forked: `tests.support.forked`), configured by
    PIGGYBACK_* variables; yields its base URL. Stopped with SIGTERM (then SIGKILL) even when the test fails.
    """
    port = free_port()
    full_env = {**os.environ, "PIGGYBACK_HOST": "127.0.0.1", "PIGGYBACK_PORT": str(port), "PIGGYBACK_DEVICE": "cpu"}
    full_env.update(env)
    process = ForkedProcess(SERVICE, full_env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=timeout, process=process)
        yield base
    finally:
        stop_process(process, grace_s=30)


def stop_process(process, grace_s: float) -> str:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`; what a forked service wrote."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if not isinstance(process, ForkedProcess):
        return ""
    output = process.output(tail=100_000)
    process.close()
    return output


def metric(base: str, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 if none yet)."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if line.split("{")[0].split(" ")[0] == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition, timeout: float = 30) -> None:
    """Poll `condition` every 20 ms until it holds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def start_service(store, weights, wait: bool = True, **settings: str) -> tuple[ForkedProcess, int]:
    """`python -m service`'s main in a real process (forked) on a resnet18 (unless `backbone=` says
    otherwise), configured by `settings` (lowercase PIGGYBACK_* names); returns once ready (unless not
    `wait`). The caller stops it (`stop_process`)."""
    from tests.support.builders import ADMIN_TOKEN

    port = free_port()
    env = {
        **os.environ,
        "PIGGYBACK_BACKBONE": "resnet18",
        "PIGGYBACK_WEIGHTS": str(weights),
        "PIGGYBACK_STORE": str(store),
        "PIGGYBACK_ADMIN_TOKEN": ADMIN_TOKEN,
        "PIGGYBACK_HOST": "127.0.0.1",
        "PIGGYBACK_PORT": str(port),
        "PIGGYBACK_DEVICE": "cpu",
        "PIGGYBACK_LOG_LEVEL": "warning",
        **{f"PIGGYBACK_{name.upper()}": value for name, value in settings.items()},
    }
    process = ForkedProcess(SERVICE, env)
    if not wait:
        SERVICE_URLS.add(f"http://127.0.0.1:{port}")
        return process, port
    try:
        wait_ready(f"http://127.0.0.1:{port}", process=process)
    except BaseException:
        stop_process(process, grace_s=5)
        raise
    return process, port


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, as the kernel counts it."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def readiness_saying(base: str, words: str, process=None, timeout: float = 60) -> httpx.Response | None:
    """Poll `/readyz` until its answer contains `words` (or `process` exited, or `timeout`); the last answer."""
    deadline, answer = time.monotonic() + timeout, None
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            answer = httpx.get(f"{base}/readyz")
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if words in answer.text:
            break
        time.sleep(0.2)
    return answer


def run_as_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` for a command that starts processes of its own (a shell starting a server, a
    script starting benchmarks): it runs in its own process group, killed whole when it returns or
    times out, so nothing it started outlives a failing test."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    out = err = ""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:  # SIGTERM first: a command that started groups of its own (scripts/gpu_check.py) ends them
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=grace)
    return subprocess.CompletedProcess(command, process.returncode, out, err)
