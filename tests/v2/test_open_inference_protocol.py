"""The Open Inference Protocol (KServe V2) routes, spoken to by the real Triton client, against the
real server process; every answer is checked against our own `/tasks/{name}/predict`."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from mask_store import TaskStore, artifact_bytes, build_transform
from tests.support.builders import random_task_artifact
from tests.support.servers import jpeg_bytes, png_bytes, start_service, stop_process

pytestmark = pytest.mark.slow  # starts the server as its own process

LABELS = ("zero", "one", "two", "three")
IMAGES = [png_bytes(1), png_bytes(2, mode="RGB"), jpeg_bytes(3, size=40)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone_file, resnet18):
    """`python -m service` in its own process, with one task `alpha` (version 3) in its store."""
    store = tmp_path_factory.mktemp("store")
    artifact = random_task_artifact(resnet18, "resnet18", task="alpha", version=3, labels=LABELS, seed=4)
    TaskStore(store).put(artifact_bytes(artifact))
    process, port = start_service(store, backbone_file, max_images_per_request="4", max_request_bytes=str(1024 * 1024))
    try:
        yield f"http://127.0.0.1:{port}", artifact
    finally:
        log = stop_process(process, grace_s=30)
        assert "Traceback" not in log, log  # no request on these routes may crash a handler


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server[0].removeprefix("http://"))
    yield client
    client.close()


def own_route_probabilities(base: str, images: list[bytes]) -> np.ndarray:
    """[N, classes] float32 from `/tasks/alpha/predict` with top_k = every class, put back in index order."""
    files = [("images", (f"{i}.img", data)) for i, data in enumerate(images)]
    response = httpx.post(f"{base}/tasks/alpha/predict", params={"top_k": len(LABELS)}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    probabilities = np.zeros((len(images), len(LABELS)), dtype=np.float32)
    for row, prediction in enumerate(response.json()["predictions"]):
        for scored in prediction["top_k"]:
            probabilities[row, scored["index"]] = scored["score"]
    return probabilities


def image_input(images: list[bytes], binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object))
    else:  # JSON carries bytes as base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=object), binary_data=False)
    return tensor


def test_health_and_metadata(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert set(client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    assert client.is_model_ready("alpha") and client.is_model_ready("alpha", "3")
    assert not client.is_model_ready("nope") and not client.is_model_ready("alpha", "2")
    metadata = client.get_model_metadata("alpha", "3")
    assert metadata == client.get_model_metadata("alpha")
    assert metadata["name"] == "alpha" and metadata["versions"] == ["3"]
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)),
        ("input", "FP32", (-1, 3, 16, 16)),
    }
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(LABELS)]}]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404" and "nope" in caught.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_images_equal_our_own_route(server, client, binary):
    base, _ = server
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("alpha", [image_input(IMAGES, binary)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == "alpha" and response["model_version"] == "3" and response["id"] == "r-1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(IMAGES), len(LABELS))
    np.testing.assert_array_equal(probabilities, own_route_probabilities(base, IMAGES))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensors_equal_our_own_route(server, client, binary):
    """Images preprocessed here, from the artifact's own preprocessing spec, answer as the encoded images do."""
    base, artifact = server
    transform = build_transform(artifact.manifest.preprocess)
    pixels = torch.stack([transform(Image.open(io.BytesIO(data))) for data in IMAGES]).numpy()
    tensor = httpclient.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    result = client.infer("alpha", [tensor], model_version="3")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), own_route_probabilities(base, IMAGES))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension_gives_our_top_k(server, client, binary):
    base, _ = server
    top_k = httpx.post(
        f"{base}/tasks/alpha/predict", params={"top_k": 2}, files=[("images", ("a.png", IMAGES[0]))]
    ).json()["predictions"][0]["top_k"]
    result = client.infer(
        "alpha",
        [image_input(IMAGES[:1], True)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)],
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (1, 2)
    # the client gives bytes from the binary form, str from JSON
    parsed = [(entry.decode() if isinstance(entry, bytes) else entry).split(":") for entry in classes[0]]
    assert [(float(s), int(i), label) for s, i, label in parsed] == [
        (t["score"], t["index"], t["label"]) for t in top_k
    ]


def test_classification_at_request_level_applies_to_every_output(server):
    """`parameters: {"classification": k}` on the request (not only on an output) is honoured."""
    base, _ = server
    top_k = httpx.post(
        f"{base}/tasks/alpha/predict", params={"top_k": 3}, files=[("images", ("a.png", IMAGES[0]))]
    ).json()["predictions"][0]["top_k"]
    request = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(IMAGES[0]).decode()]}
        ],
        "parameters": {"classification": 3},
    }
    answer = httpx.post(f"{base}/v2/models/alpha/infer", json=request)
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    assert [entry.split(":") for entry in output["data"]] == [
        [str(t["score"]), str(t["index"]), t["label"]] for t in top_k
    ]
    bad = httpx.post(f"{base}/v2/models/alpha/infer", json={**request, "parameters": {"classification": 0}})
    assert bad.status_code == 400 and "classification" in bad.json()["error"]


def infer_error(client, model: str, tensor, version: str = "") -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [tensor], model_version=version)
    return caught.value


def fp32_input(name: str, shape: list[int]) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, shape, "FP32")
    return tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32))


def bytes_as(name: str) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, [1], "BYTES")
    return tensor.set_data_from_numpy(np.array([IMAGES[0]], dtype=object))


TRUNCATED_PNG = png_bytes(5)[:60]


@pytest.mark.parametrize(
    "model, version, make_input, status, says",
    [
        ("nope", "", lambda: image_input(IMAGES[:1], True), "404", "nope"),
        ("alpha", "2", lambda: image_input(IMAGES[:1], True), "404", "version"),
        ("alpha", "", lambda: fp32_input("image", [1]), "400", "BYTES"),
        ("alpha", "", lambda: bytes_as("input"), "400", "FP32"),
        ("alpha", "", lambda: fp32_input("input", [1, 3, 8, 8]), "400", "shape"),
        ("alpha", "", lambda: fp32_input("input", [2, 48]), "400", "shape"),
        ("alpha", "", lambda: fp32_input("pixels", [1, 3, 16, 16]), "400", "unknown input"),
        ("alpha", "", lambda: image_input([TRUNCATED_PNG], True), "400", "corrupt"),
        ("alpha", "", lambda: image_input([b"not an image at all"], False), "415", "not a supported image"),
        ("alpha", "", lambda: image_input(IMAGES[:1] * 5, True), "413", "at most 4"),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "image-as-fp32",
        "input-as-bytes",
        "wrong-size",
        "wrong-rank",
        "unknown-input",
        "corrupt-image",
        "not-an-image",
        "too-many",
    ],
)
def test_bad_requests_get_the_protocols_error(server, client, model, version, make_input, status, says):
    error = infer_error(client, model, make_input(), version)
    assert error.status() == status, error
    assert says in error.message(), error.message()
    # nothing is lost: the next good request is answered
    assert client.infer("alpha", [image_input(IMAGES[:1], True)]).as_numpy("probabilities").shape == (1, len(LABELS))


FP32_JSON = (
    b'{"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.5'
    + b", 0.5" * (3 * 16 * 16 - 1)
    + b"]}]}"
)
BINARY_HEADER = (
    b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]}'
)


@pytest.mark.parametrize(
    "body, headers, says",
    [
        (b"{not json", {}, "not valid JSON"),
        (b'{"inputs": []}', {}, "non-empty"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', {}, "neither"),
        (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["!!"]}]}', {}, "base64"),
        (b'{"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [1]}]}', {}, "values"),
        (FP32_JSON.replace(b"[0.5", b"[1e999"), {}, "infinite"),
        (FP32_JSON.replace(b"[0.5", b"[" + b"9" * 500), {}, "does not fit"),
        (FP32_JSON.replace(b"[0.5", b"[" * 5000 + b"0.5" + b"]" * 5000), {}, "JSON"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length"),
        (BINARY_HEADER + b"\x05\x00\x00\x00abc", {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, "BYTES"),
    ],
    ids=[
        "not-json",
        "no-inputs",
        "no-data",
        "bad-base64",
        "too-few-values",
        "infinite",
        "huge-integer",
        "deep-nesting",
        "header-past-body",
        "bad-bytes-framing",
    ],
)
def test_malformed_bodies_get_400_with_error(server, body, headers, says):
    response = httpx.post(f"{server[0]}/v2/models/alpha/infer", content=body, headers=headers)
    assert response.status_code == 400 and says in response.json()["error"], response.text


def test_oversized_body_and_not_ready_shapes(server):
    too_big = httpx.post(f"{server[0]}/v2/models/alpha/infer", content=b"x" * (1024 * 1024 + 1))
    assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]
    gzip = httpx.post(f"{server[0]}/v2/models/alpha/infer", content=b"{}", headers={"Content-Encoding": "gzip"})
    assert gzip.status_code == 415 and "Content-Encoding" in gzip.json()["error"]


def test_v2_requests_are_counted_in_the_same_metrics(server, client):
    def served() -> float:
        text = httpx.get(f"{server[0]}/metrics").text
        line = next(
            x
            for x in text.splitlines()
            if x.startswith('piggyback_request_latency_seconds_count{status="200",task="alpha"}')
        )
        return float(line.split()[-1])

    before = served()
    client.infer("alpha", [image_input(IMAGES[:1], True)])
    assert served() == before + 1


def test_readme_example_runs(server, tmp_path):
    base, _ = server
    readme = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = readme[readme.index("## Open Inference Protocol") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python\n") + 10)]
    statements = [line for line in example.splitlines() if line.strip() and not line.startswith(("from ", "import "))]
    assert len(statements) == 2  # imports, build the input, infer: three lines (ruff format splits the imports)
    (tmp_path / "digit.png").write_bytes(IMAGES[0])
    example = example.replace("127.0.0.1:8000", base.removeprefix("http://")).replace('"mnist"', '"alpha"')
    run = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[[") and len(run.stdout.split()) == len(LABELS)


def test_while_loading_every_v2_route_but_live_answers_503_error(tmp_path, backbone_file):
    """Without its lifespan the app never becomes ready: the protocol's 503, and /docs still describes infer."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.support.builders import server_settings

    client = TestClient(create_app(server_settings(backbone_file, tmp_path / "store")))
    assert client.get("/v2/health/live").status_code == 200
    for method, path in [("GET", "/v2/health/ready"), ("GET", "/v2/models/alpha"), ("POST", "/v2/models/alpha/infer")]:
        response = client.request(method, path, content=b"{}")
        assert response.status_code == 503 and "loading" in response.json()["error"], response.text
    infer = client.get("/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
