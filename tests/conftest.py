"""Shared fixtures: tiny real torchvision backbones, a backbone file, an S3 server, the HTTP contract guard.

The helpers tests import (settings, artifacts, the training CLI) live in `tests/support/builders.py`."""

from __future__ import annotations

import os
import uuid

# Under pytest-xdist (`make test`: two workers on two cores) each worker, and every process its tests
# start (servers, CLIs, benchmarks: they inherit this), runs torch on one thread. Two workers of two
# OpenMP threads each, plus the servers they start, oversubscribe the cores and spin: a training test
# that takes 9 s alone took 75 s in the parallel pass.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Run Triton kernels on the CPU through Triton's interpreter. Must precede the first import of
    # triton (torchvision imports it), because @triton.jit picks interpreter or compiler on import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mask_store import BackboneLayout, build_backbone  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return build_backbone("resnet18")


@pytest.fixture(scope="session")
def resnet18_layout(resnet18):
    return BackboneLayout.from_model("resnet18", resnet18)


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("backbone") / "resnet18.pt"
    torch.save(resnet18.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def http_contract_guard(request, monkeypatch):
    """Fail the test on any 500 or non-JSON answer from a server it started (see tests/support/http_guard.py)."""
    import httpx

    from tests.support.http_guard import contract_violation, is_service_url

    allow = request.node.get_closest_marker("allow_server_errors") is not None
    violations: list[str] = []

    def check(response: httpx.Response) -> None:
        if is_service_url(response.request.url) and (problem := contract_violation(response, allow)):
            violations.append(problem)
            raise AssertionError(f"HTTP contract broken: {problem}")

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, **kwargs):
        response = sync_send(self, request, **kwargs)
        check(response)
        return response

    async def asend(self, request, **kwargs):
        response = await async_send(self, request, **kwargs)
        check(response)
        return response

    monkeypatch.setattr(httpx.Client, "send", send)
    monkeypatch.setattr(httpx.AsyncClient, "send", asend)
    yield
    # also catches a violation whose AssertionError a worker thread or a broad `except` swallowed
    assert not violations, "HTTP contract broken:\n" + "\n".join(violations)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback with a bucket and one user's keys (tests/support/s3_server.py); stopped by pid."""
    from tests.support.s3_server import moto_s3

    with moto_s3() as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the test server, for this process and its children."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.env(AWS_EC2_METADATA_DISABLED="true").items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def store_location(request, tmp_path) -> tuple[str, str]:
    """(kind, location): a fresh directory, or a fresh prefix in the shared test bucket."""
    if request.param == "local":
        return "local", str(tmp_path / "store")
    server = request.getfixturevalue("s3_env")
    return "s3", f"s3://{server.bucket}/{uuid.uuid4().hex}"


def pytest_collection_modifyitems(config, items):
    """`make test-fast` is one parallel run of the tests not marked slow: a serial test must be slow too."""
    marked = [(item.nodeid, {mark.name for mark in item.iter_markers()}) for item in items]
    fast_serial = [nodeid for nodeid, names in marked if "serial" in names and "slow" not in names]
    if fast_serial:
        raise pytest.UsageError(f"serial tests must also be marked slow: {fast_serial}")
