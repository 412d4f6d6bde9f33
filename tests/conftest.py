"""Shared fixtures: tiny real torchvision backbones and a trained-looking artifact, all on CPU."""

from __future__ import annotations

import hashlib
import os
import uuid

import torch

if not torch.cuda.is_available():
    # Run Triton kernels on the CPU through Triton's interpreter. Must precede the first import of
    # triton (torchvision imports it), because @triton.jit picks interpreter or compiler on import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mask_store import BackboneLayout, build_backbone  # noqa: E402
from mask_store.synthetic import SMALL_GRAY, random_task_artifact  # noqa: E402, F401  (re-exported for the tests)

torch.set_num_threads(2)
TINY_PREPROCESS = SMALL_GRAY  # 16 px grayscale: every test model runs fast


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, to prove a backbone was never modified."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return build_backbone("resnet18")


@pytest.fixture(scope="session")
def resnet18_layout(resnet18):
    return BackboneLayout.from_model("resnet18", resnet18)


ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("backbone") / "resnet18.pt"
    torch.save(resnet18.state_dict(), path)
    return path


def server_settings(backbone_file, store, **overrides):
    from service.settings import Settings

    values = dict(
        backbone="resnet18", weights=str(backbone_file), store=store, admin_token=ADMIN_TOKEN, max_batch_delay_ms=2.0
    )
    values.update(overrides)
    return Settings(**values)


def write_digits_imagefolder(root, count: int = 300, seed: int = 0) -> None:
    """A small ImageFolder of sklearn-digit PNGs: root/train/<digit>/*.png and root/val/<digit>/*.png."""
    import numpy as np

    from training.data import sklearn_digits, stratified_split, write_image_folder

    ds = sklearn_digits()
    train, val = stratified_split(ds.subset(np.random.default_rng(seed).permutation(len(ds))[:count]), 0.3, seed=0)
    write_image_folder(train, root, "train")
    write_image_folder(val, root, "val")


def run_training_cli(weights, data, task: str, out, *extra: str):
    """`python -m training train` on resnet18 at 16px grayscale for one epoch, as a user would run it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "training", "train", "--backbone", "resnet18", "--weights", str(weights),
               "--data", str(data), "--task", task, "--out", str(out), "--epochs", "1", "--image-size", "16",
               "--grayscale", "--no-progress", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(autouse=True)
def http_contract_guard(request, monkeypatch):
    """Fail the test on any 500 or non-JSON answer from a server it started (see tests/http_guard.py)."""
    import httpx

    from tests.http_guard import contract_violation, is_service_url

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
    """moto's S3 server on loopback with a bucket and one user's keys (tests/s3_server.py); stopped by pid."""
    from tests.s3_server import moto_s3

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
